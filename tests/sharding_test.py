"""Branch-sharded execution equals the unsharded model, forward and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import IMAGE_SHAPE

from paraformer_jax import sharding
from paraformer_jax.model import ParaFormer

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


def _loss(logits):
  labels = jnp.arange(logits.shape[-2]) % logits.shape[-1]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _assert_trees_close(got, want, rtol):
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = np.asarray(want_leaf(want, path))
    scale = max(np.abs(w).max(), 1e-6)
    np.testing.assert_allclose(np.asarray(g), w, atol=rtol * scale, err_msg=str(path))


def want_leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


@pytest.mark.parametrize('data,branch', MESHES)
def test_sharded_equals_unsharded(small_model, small_params, images, data, branch):
  mesh = sharding.make_mesh(data, branch)
  params = jax.device_put(small_params, sharding.param_shardings(small_params, mesh))
  batch = sharding.global_batch(mesh, images)
  forward = sharding.sharded_apply(small_model, mesh)
  prefix = sharding.sharded_apply(small_model, mesh, 'prefix_logits')

  got, got_grads = jax.jit(jax.value_and_grad(lambda p: _loss(forward(p, batch))))(params)
  want, want_grads = jax.value_and_grad(
      lambda p: _loss(small_model.apply({'params': p}, images)))(small_params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _assert_trees_close(got_grads, want_grads, rtol=1e-4)
  # Gradients of the branch stack stay sharded over 'branch'.
  g = jax.tree.leaves(got_grads['branches'])[0]
  assert g.sharding.spec[0] == 'branch' or branch == 1

  np.testing.assert_allclose(jax.jit(forward)(params, batch),
                             small_model.apply({'params': small_params}, images),
                             rtol=1e-5, atol=1e-5)
  want_prefix = small_model.apply({'params': small_params}, images,
                                  method=ParaFormer.prefix_logits)
  np.testing.assert_allclose(jax.jit(prefix)(params, batch), want_prefix, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('strategy', ['scan', 'unrolled', 'fused'])
def test_strategies_under_shard_map_equal_unsharded_vmap(small_model, small_params, images,
                                                        strategy):
  """Each device runs its 2 local branches with the strategy, then the psum. The loss
  counts every prefix and the full model (which `fused` computes with its fused fc2)."""
  mesh = sharding.make_mesh(2, 4)
  model = small_model.clone(branch_strategy=strategy)
  params = jax.device_put(small_params, sharding.param_shardings(small_params, mesh))
  batch = sharding.global_batch(mesh, images)
  prefix = sharding.sharded_apply(model, mesh, 'prefix_logits')
  full = sharding.sharded_apply(model, mesh)
  flat = lambda logits: _loss(logits.reshape(-1, logits.shape[-1]))  # every prefix counts
  got, got_grads = jax.jit(jax.value_and_grad(
      lambda p: flat(prefix(p, batch)) + _loss(full(p, batch))))(params)
  vmap = small_model.clone(branch_strategy='vmap')
  want, want_grads = jax.value_and_grad(lambda p: flat(vmap.apply(
      {'params': p}, images, method=ParaFormer.prefix_logits)) + _loss(vmap.apply(
          {'params': p}, images)))(small_params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  _assert_trees_close(got_grads, want_grads, rtol=1e-4)


def test_params_are_created_sharded(small_model, small_params):
  mesh = sharding.make_mesh(2, 4)
  params = sharding.init_params(small_model, mesh, jax.random.key(0), IMAGE_SHAPE)
  leaf = params['branches']['branch']['block0']['mlp']['fc1']['kernel']
  assert leaf.shape[0] == 8
  # Each device holds 8 / 4 = 2 branches of the stack.
  assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}
  assert params['head']['out']['kernel'].sharding.is_fully_replicated
  # Same values as an unsharded init with the same key.
  np.testing.assert_array_equal(leaf, small_params['branches']['branch']['block0']['mlp']['fc1']
                                ['kernel'])


@pytest.fixture(scope='module')
def dropout_model():
  return ParaFormer(num_classes=10, patch_size=4, width=64, num_heads=1, mlp_dim=128,
                    num_branches=8, branch_depth=1, dropout=0.5)


def test_dropout_masks_do_not_depend_on_the_mesh(dropout_model, images):
  """Every mesh draws the masks one device draws (per global example and branch)."""
  params = dropout_model.init(jax.random.key(0), images[:1])['params']
  key = jax.random.key(1)
  want = dropout_model.apply({'params': params}, images, True, rngs={'dropout': key})
  assert np.abs(np.asarray(want - dropout_model.apply({'params': params}, images))).max() > 1e-2
  for data, branch in [(1, 8), (2, 4), (8, 1)]:
    fwd = jax.jit(sharding.sharded_apply(dropout_model, sharding.make_mesh(data, branch)),
                  static_argnums=2)
    np.testing.assert_allclose(fwd(params, images, True, key), want, rtol=1e-5, atol=1e-5,
                               err_msg=f'mesh {data}x{branch}')
  # Another key, other masks; evaluation has none.
  assert np.abs(np.asarray(fwd(params, images, True, jax.random.key(2)) - want)).max() > 1e-2
  np.testing.assert_allclose(fwd(params, images, False),
                             dropout_model.apply({'params': params}, images), rtol=1e-5,
                             atol=1e-5)


def test_masks_are_independent_per_example_and_branch():
  """Same input rows and same branch weights: only the masks can tell them apart."""
  from paraformer_jax.model import Dropout
  x = jnp.ones((4, 3, 16))
  key = jax.random.key(0)
  out = Dropout(0.5).apply({}, x, False, (key, jnp.arange(4), jnp.asarray(3)))
  kept = np.asarray(out != 0).reshape(4, -1)
  assert len({row.tobytes() for row in kept}) == 4  # one mask per example
  other = Dropout(0.5).apply({}, x, False, (key, jnp.arange(4), jnp.asarray(4)))
  assert not np.array_equal(np.asarray(other != 0).reshape(4, -1), kept)  # per branch
  assert 0.3 < kept.mean() < 0.7  # rate 0.5, 192 draws
  np.testing.assert_allclose(np.asarray(out)[kept.reshape(out.shape)], 2.0)  # scaled by 1/keep


def test_indivisible_branch_count_is_refused_before_compiling():
  model = ParaFormer(num_classes=10, num_branches=6, branch_depth=1)
  mesh = sharding.make_mesh(2, 4)
  with pytest.raises(ValueError, match=r'num_branches=6 is not divisible by the mesh branch '
                                       r'axis size 4.*\[1, 2, 3, 6\]'):
    sharding.init_params(model, mesh, jax.random.key(0), IMAGE_SHAPE)
  with pytest.raises(ValueError, match='num_branches=6'):
    sharding.sharded_apply(model, mesh)


def test_bad_mesh_shapes_are_refused():
  with pytest.raises(ValueError, match='needs 12 devices but 8 are available'):
    sharding.make_mesh(3, 4)
  with pytest.raises(ValueError, match='branch=3 does not divide the 8 devices'):
    sharding.make_mesh(-1, 3)
  with pytest.raises(ValueError, match='batch size 6 is not divisible by the mesh data axis'):
    sharding.check_divisible(ParaFormer(num_classes=2, num_branches=4), sharding.make_mesh(4, 2),
                             batch_size=6)
