"""The model against independent computations: a numpy block, a loop over branches, slices."""
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, SMALL

from paraformer_jax import model as model_lib
from paraformer_jax.model import Block, Branch, ParaFormer


def _np_layernorm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


EPS = {'prenorm': 1e-6, 'reference': 1e-5}  # Flax's default; torch's, as the authors' model


def _np_block(x, p, style):
  """A block written from DESIGN.md in numpy, independent of the Flax code."""
  from scipy.special import erf
  p = jax.tree.map(np.asarray, p)
  eps = EPS[style]
  h = _np_layernorm(x, p['norm1'], eps)
  qkv = np.einsum('btd,dsnh->btsnh', h, p['attn']['qkv']['kernel'])
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  s = np.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(q.shape[-1])
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum('bnqk,bknh->bqnh', a, v)
  y = np.einsum('bqnh,nhd->bqd', o, p['attn']['out']['kernel']) + p['attn']['out']['bias']
  x = y + (h if style == 'reference' else x)
  h = _np_layernorm(x, p['norm2'], eps)
  u = h @ p['mlp']['fc1']['kernel'] + p['mlp']['fc1']['bias']
  u = 0.5 * u * (1 + erf(u / np.sqrt(2)))
  y = u @ p['mlp']['fc2']['kernel'] + p['mlp']['fc2']['bias']
  return y + (h if style == 'reference' else x)


@pytest.mark.parametrize('scale', [1.0, 1e-3], ids=['unit', 'low_variance'])
@pytest.mark.parametrize('style', ['prenorm', 'reference'])
def test_block_matches_numpy(style, scale, monkeypatch):
  """Low-variance tokens (var ~1e-6) make LayerNorm's epsilon matter: 1e-5 and 1e-6 then
  give outputs apart by far more than the tolerance."""
  block = Block(num_heads=2, mlp_dim=32, dropout=0.0, style=style, dtype=jnp.float32)
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, 16))) * scale
  params = block.init(jax.random.key(0), x, True)['params']
  got = block.apply({'params': params}, x, True)
  want = _np_block(x.astype(np.float64), params, style)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # A branch's last block under cls pooling computes the cls token's row only, its query
  # projection in one matmul with keys and values or, from SPLIT_QUERY_ROWS rows, apart.
  for split_rows in (10**9, 0):
    monkeypatch.setattr(model_lib, 'SPLIT_QUERY_ROWS', split_rows)
    cls_only = block.apply({'params': params}, x, True, cls_only=True)
    np.testing.assert_allclose(cls_only, want[:, :1], atol=2e-5)


def test_vmapped_stack_equals_loop_over_branches(small_model, small_params, images):
  small_model = small_model.clone(branch_strategy='vmap')
  tokens = small_model.apply({'params': small_params}, images, True,
                             method=lambda m, x, d: m.embed(x, d))
  branch = Branch(2, SMALL['num_heads'], SMALL['mlp_dim'], 0.0, 'prenorm', 'cls', jnp.float32)
  stacked = small_params['branches']['branch']
  total = sum(branch.apply({'params': jax.tree.map(lambda a: a[i], stacked)}, tokens, True)
              for i in range(small_model.num_branches))
  head = model_lib.Head(SMALL['num_classes'], SMALL['width'], jnp.float32)
  want = head.apply({'params': small_params['head']}, total)
  got = small_model.apply({'params': small_params}, images)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_prefix_logits(small_model, small_params, images):
  prefix = small_model.apply({'params': small_params}, images, method=ParaFormer.prefix_logits)
  assert prefix.shape == (8, images.shape[0], SMALL['num_classes'])
  full = small_model.apply({'params': small_params}, images)
  np.testing.assert_allclose(prefix[-1], full, rtol=1e-5, atol=1e-5)
  for k in (1, 3):
    # A model built with k branches from hand-sliced parameters.
    sliced = dict(small_params, branches=jax.tree.map(lambda a: a[:k], small_params['branches']))
    want = ParaFormer(num_branches=k, branch_depth=2, **SMALL).apply({'params': sliced}, images)
    np.testing.assert_allclose(prefix[k - 1], want, rtol=1e-5, atol=1e-5)
    sub_model, sub_params = model_lib.first_branches(small_model, small_params, k)
    np.testing.assert_allclose(sub_model.apply({'params': sub_params}, images), want,
                               rtol=1e-6, atol=1e-6)
    # k branches really differ from all of them (the slice is not a no-op).
    assert np.abs(np.asarray(want - full)).max() > 1e-3


def test_sequential_baseline_is_a_plain_stack_of_blocks(images):
  depth = 3
  vit = model_lib.sequential_baseline(depth, **SMALL)
  params = vit.init(jax.random.key(5), images[:1])['params']
  assert jax.tree.leaves(params['branches'])[0].shape[0] == 1
  x = vit.apply({'params': params}, images, True, method=lambda m, x, d: m.embed(x, d))
  for i in range(depth):
    block = Block(SMALL['num_heads'], SMALL['mlp_dim'], 0.0, 'prenorm', jnp.float32)
    p = jax.tree.map(lambda a: a[0], params['branches']['branch'][f'block{i}'])
    x = block.apply({'params': p}, x, True)
  want = model_lib.Head(10, 64, jnp.float32).apply({'params': params['head']}, x[:, 0])
  np.testing.assert_allclose(vit.apply({'params': params}, images), want, rtol=1e-5, atol=1e-5)


def test_paper_configuration_parameter_count():
  model = ParaFormer(num_classes=10, patch_size=16, width=192, num_heads=3, mlp_dim=768,
                     num_branches=8, branch_depth=2, block_style='reference')
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  assert model_lib.param_count(shapes) == 7_296_586
  assert model_lib.param_count(shapes['embed']) == 185_664
  assert model_lib.param_count(shapes['head']) == 2_314
  assert model_lib.param_count(shapes['branches']) == 16 * 444_288


def _np_sincos(rows, cols, width):
  """big_vision's posemb_sincos_2d, entry by entry: [sin x, cos x, sin y, cos y] of each
  patch's column x and row y at frequencies 10000 ** -(d / (width / 4 - 1))."""
  q = width // 4
  pe = np.zeros((rows * cols, width))
  for m in range(rows * cols):
    y, x = divmod(m, cols)
    for d in range(q):
      omega = 10_000. ** -(d / (q - 1))
      pe[m, [d, q + d, 2 * q + d, 3 * q + d]] = (np.sin(x * omega), np.cos(x * omega),
                                                   np.sin(y * omega), np.cos(y * omega))
  return pe


def _np_forward(params, images, style, pool, eps, posemb='learned', pre_logits=False):
  """The whole model in numpy from DESIGN.md: patches (p1 p2 c order), cls, positions, each
  branch's blocks, pooling, the sum over branches, the head (big_vision's options: fixed
  sin-cos positions on the patches only, a tanh pre-logits layer)."""
  p = jax.tree.map(np.asarray, params)
  b, h, w, c = images.shape
  ps = 4
  x = np.asarray(images).reshape(b, h // ps, ps, w // ps, ps, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, -1, ps * ps * c) @ p['embed']['patch']['kernel'] + p['embed']['patch']['bias']
  if posemb == 'sincos2d':
    x = x + _np_sincos(h // ps, w // ps, x.shape[-1])
  x = np.concatenate([np.broadcast_to(p['embed']['cls'], (b, 1, x.shape[-1])), x], 1)
  if posemb == 'learned':
    x = x + p['embed']['pos']
  pooled = 0
  for i in range(p['branches']['branch']['block0']['norm1']['scale'].shape[0]):
    y = x
    for name in sorted(p['branches']['branch']):
      y = _np_block(y, jax.tree.map(lambda a: a[i], p['branches']['branch'][name]), style)
    pooled = pooled + (y.mean(1) if pool == 'mean' else y[:, 0])
  z = _np_layernorm(pooled, p['head']['norm'], eps)
  if pre_logits:
    z = np.tanh(z @ p['head']['pre']['kernel'] + p['head']['pre']['bias'])
  return z @ p['head']['out']['kernel'] + p['head']['out']['bias']


@pytest.mark.parametrize('pool', ['mean', 'cls'])
def test_whole_model_and_pooling_match_numpy(images, pool):
  model = ParaFormer(num_branches=2, branch_depth=1, pool=pool, block_style='reference',
                     **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  want = _np_forward(params, images, 'reference', pool, EPS['reference'])
  np.testing.assert_allclose(model.apply({'params': params}, images), want, rtol=2e-4,
                             atol=2e-4)


def test_big_vision_options_match_numpy(images):
  """pool='mean' + posemb='sincos2d' + pre_logits + head_zero_init: big_vision's ViT head."""
  model = ParaFormer(num_branches=2, branch_depth=1, pool='mean', block_style='prenorm',
                     posemb='sincos2d', pre_logits=True, head_zero_init=True, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  assert 'pos' not in params['embed']  # fixed, not a parameter
  assert not np.asarray(params['head']['out']['kernel']).any()  # zero-initialized
  assert np.asarray(params['head']['pre']['kernel']).std() > 0.01
  # A trained head, so that the logits depend on everything above it.
  params = {**params, 'head': {**params['head'], 'out': {
      'kernel': jax.random.normal(jax.random.key(1), params['head']['out']['kernel'].shape),
      'bias': params['head']['out']['bias']}}}
  want = _np_forward(params, images, 'prenorm', 'mean', EPS['prenorm'], 'sincos2d', True)
  np.testing.assert_allclose(model.apply({'params': params}, images), want, rtol=2e-4,
                             atol=2e-4)
  np.testing.assert_allclose(model_lib.posemb_sincos_2d(3, 5, 64)[0], _np_sincos(3, 5, 64),
                             atol=1e-6)


def test_mean_pool_and_reference_init(images):
  model = ParaFormer(num_branches=2, branch_depth=1, pool='mean', block_style='reference',
                     **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  # The authors' N(0, 1) init, not 0.02: the std of 320 draws is far from 0.02.
  assert 0.8 < float(jnp.std(params['embed']['pos'])) < 1.2
  prefix = model.apply({'params': params}, images, method=ParaFormer.prefix_logits)
  np.testing.assert_allclose(prefix[-1], model.apply({'params': params}, images),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(small_model, small_params, images):
  bf16 = small_model.clone(dtype=jnp.bfloat16)
  params = bf16.init(jax.random.key(0), images[:1])['params']
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype('float32')}
  got = bf16.apply({'params': small_params}, images)
  want = small_model.apply({'params': small_params}, images)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=0.1 * float(jnp.abs(want).max()))
  # Every matmul really takes bf16 operands: the compute dtype, not a cast of the result.
  jaxpr = jax.make_jaxpr(lambda p, x: bf16.apply({'params': p}, x))(small_params, images)
  dots = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
  # per block qkv, scores, mix, out, fc1, fc2 (branches batched in one), the embed, the head
  assert len(dots) >= 6 * small_model.branch_depth + 2
  assert {v.aval.dtype for e in dots for v in e.invars} == {jnp.dtype('bfloat16')}


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (pjit, scan, custom_vjp...) included."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(sub, 'jaxpr', sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _equations(inner)


def test_image_not_divisible_by_patch_is_refused(small_model):
  with pytest.raises(ValueError, match=r'10x10 is not divisible by patch_size=4'):
    jax.eval_shape(small_model.init, jax.random.key(0), jnp.zeros((1, 10, 10, 3)))


def test_dropout_differs_per_branch_and_is_off_at_eval(images):
  model = ParaFormer(num_branches=2, branch_depth=1, dropout=0.5, **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  a = model.apply({'params': params}, images, True, rngs={'dropout': jax.random.key(1)})
  b = model.apply({'params': params}, images, True, rngs={'dropout': jax.random.key(2)})
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  np.testing.assert_array_equal(model.apply({'params': params}, images),
                                model.apply({'params': params}, images))


@pytest.fixture(scope='module')
def strategy_cases(small_model, small_params, images):
  """{case: (vmap model, params, want loss, want gradients)} for the strategy tests.

  Two corners: depth 2 prenorm, and depth 1 reference (block 0 is also the last block).
  The loss sums every prefix's logits and the full model's; its value comes from a Python
  loop over first-k models, independent of any strategy, and the gradients from the plain
  vmap stack.
  """
  depth1 = ParaFormer(num_branches=8, branch_depth=1, block_style='reference', **SMALL)
  cases = {'prenorm_depth2': (small_model, small_params),
           'reference_depth1': (depth1, depth1.init(jax.random.key(3), images[:1])['params'])}
  out = {}
  for case, (model, params) in cases.items():
    model = model.clone(branch_strategy='vmap')
    want = 0.0
    for k in range(1, model.num_branches + 1):
      sub, sub_params = model_lib.first_branches(model, params, k)
      want += float(jax.jit(sub.apply)({'params': sub_params}, images).sum()) * (
          2 if k == model.num_branches else 1)  # the full model counts twice
    out[case] = (model, params, want, _prefix_loss(model, images)(params)[1])
  return out


def _assert_close_f32(got, want):
  """Equal up to f32 rounding, which grows with the size of the largest entries summed."""
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def _prefix_loss(model, images):
  """Every prefix's logits and the full model's (which `fused` computes differently)."""
  def loss(p):
    return (model.apply({'params': p}, images, method=ParaFormer.prefix_logits).sum()
            + model.apply({'params': p}, images).sum())
  return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize('strategy', ['scan', 'unrolled', 'fused', 'auto'])
@pytest.mark.parametrize('case', ['prenorm_depth2', 'reference_depth1'])
def test_branch_strategies_agree_forward_and_gradients(strategy_cases, images, strategy, case):
  vmap_model, params, want, want_grads = strategy_cases[case]
  model = vmap_model.clone(branch_strategy=strategy)
  got, got_grads = _prefix_loss(model, images)(params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  jax.tree.map(_assert_close_f32, got_grads, want_grads)
  # Every strategy initializes the same tree of shapes.
  init = model.init(jax.random.key(0), images[:1])['params']
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)


@pytest.mark.parametrize('style,depth,pool', [('prenorm', 1, 'mean'), ('reference', 2, 'cls')])
def test_fused_equals_vmap_in_the_other_corners(images, style, depth, pool):
  """The fused start of block 0 is the one style-specific strategy: the remaining pairs of
  style and depth, against vmap (itself checked against slices and numpy above)."""
  vmap = ParaFormer(num_branches=8, branch_depth=depth, block_style=style, pool=pool, **SMALL,
                    branch_strategy='vmap')
  params = vmap.init(jax.random.key(4), images[:1])['params']
  want, want_grads = _prefix_loss(vmap, images)(params)
  got, got_grads = _prefix_loss(vmap.clone(branch_strategy='fused'), images)(params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  jax.tree.map(_assert_close_f32, got_grads, want_grads)


def _contractions(jaxpr):
  """Sorted sizes of the contracted axes of every dot_general in a jaxpr and its sub-jaxprs."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      shape = eqn.invars[0].aval.shape
      out.append(tuple(sorted(shape[a] for a in eqn.params['dimension_numbers'][0][0])))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _contractions(sub)
  return out


def test_fused_applies_every_last_fc2_and_the_branch_sum_as_one_matmul(small_model, small_params,
                                                                        images):
  """The full model's logits under 'fused' contract [branches, batch, mlp] with
  [branches, mlp, D] in one dot_general over (branches, mlp); prefix logits need every
  branch's own sum, so they keep per-branch fc2s."""
  fused = small_model.clone(branch_strategy='fused')
  fused_fc2 = tuple(sorted((fused.num_branches, fused.mlp_dim)))
  full = jax.make_jaxpr(lambda p: fused.apply({'params': p}, images))(small_params)
  prefix = jax.make_jaxpr(lambda p: fused.apply({'params': p}, images,
                                                method=ParaFormer.prefix_logits))(small_params)
  assert _contractions(full.jaxpr).count(fused_fc2) == 1
  assert fused_fc2 not in _contractions(prefix.jaxpr)


def test_auto_strategy_rule_on_cpu():
  """The rule docs/benchmarks.md measured: batched when tiny, a loop otherwise, strictly one
  branch at a time once a branch's activations are large."""
  mlp_row = 768 * 4
  assert model_lib.auto_strategy(1, 256 * 65, mlp_row) == 'unrolled'
  assert model_lib.auto_strategy(8, 1 * 65, mlp_row) == 'vmap'
  assert model_lib.auto_strategy(8, 64 * 65, mlp_row) == 'unrolled'
  assert model_lib.auto_strategy(8, 256 * 65, mlp_row) == 'scan'
  assert model_lib.auto_strategy(2, 256 * 65, 768 * 2) == 'unrolled'  # bf16: half the bytes


def test_qkv_kernel_starts_as_a_dense_general_would():
  """Checkpoints and seeds from before `project_qkv` keep their meaning: same name, shape
  and initial values as the nn.DenseGeneral it replaced."""
  key, x = jax.random.key(7), jnp.zeros((1, 5, 64))
  dense = nn.DenseGeneral((3, 2, 64), use_bias=False).init(key, x)['params']
  ours = model_lib.QkvKernel((64, 3, 2, 64)).init(key)['params']
  np.testing.assert_array_equal(ours['kernel'], dense['kernel'])


def test_gelu_is_the_exact_erf_gelu():
  """model.gelu (erf form, for speed) against float64 x * Phi(x), the authors' nn.GELU()."""
  from scipy.special import erf
  x = np.linspace(-10, 10, 20001, dtype=np.float32)
  want = 0.5 * x.astype(np.float64) * (1 + erf(x.astype(np.float64) / np.sqrt(2)))
  np.testing.assert_allclose(np.asarray(jax.jit(model_lib.gelu)(x)), want, rtol=0, atol=2e-6)


def test_reference_style_starts_from_torch_defaults_and_prenorm_from_flax(images):
  """Reference style (init 'auto'): every Linear's weights and biases U(+-1/sqrt(fan_in))
  (bounds and the uniform's std, per parameter), LayerNorm 1 / 0, cls and positions N(0, 1).
  Prenorm keeps Flax's: zero biases, LeCun-normal kernels."""
  model = ParaFormer(num_branches=2, branch_depth=2, block_style='reference', **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  patch_dim = SMALL['patch_size'] ** 2 * IMAGE_SHAPE[-1]
  fans = {"['embed']['patch']": patch_dim, "['attn']['qkv']": SMALL['width'],
          "['attn']['out']": SMALL['num_heads'] * 64, "['mlp']['fc1']": SMALL['width'],
          "['mlp']['fc2']": SMALL['mlp_dim'], "['head']['out']": SMALL['width']}
  checked = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    path, a = jax.tree_util.keystr(path), np.asarray(leaf)
    layer = next((k for k in fans if k in path), None)
    if layer:
      bound = 1 / np.sqrt(fans[layer])
      assert np.abs(a).max() <= bound, path
      np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.25, err_msg=path)
      checked += 1
    elif 'norm' in path:
      np.testing.assert_array_equal(a, 1.0 if path.endswith("['scale']") else 0.0)
    else:
      assert path in ("['embed']['cls']", "['embed']['pos']"), path
  # patch; per block (branches stacked) qkv, out, fc1, fc2 and their biases; head
  assert checked == 2 + 2 * 7 + 2
  assert 0.7 < np.asarray(params['embed']['pos']).std() < 1.3
  flax_style = ParaFormer(num_branches=2, branch_depth=1, **SMALL).init(
      jax.random.key(0), images[:1])['params']
  assert not np.asarray(flax_style['head']['out']['bias']).any()
  np.testing.assert_allclose(np.asarray(flax_style['head']['out']['kernel']).std(),
                             1 / np.sqrt(SMALL['width']), rtol=0.3)


def test_reference_head_layernorm_uses_torchs_epsilon(images):
  model = ParaFormer(num_branches=2, branch_depth=1, block_style='reference', **SMALL)
  params = model.init(jax.random.key(0), images[:1])['params']
  pooled = np.asarray(jax.random.normal(jax.random.key(3), (4, SMALL['width']))) * 1e-3
  got = model.apply({'params': params}, pooled, method=lambda m, x: m.head(x))
  p = jax.tree.map(np.asarray, params['head'])
  want = _np_layernorm(pooled.astype(np.float64), p['norm'], 1e-5) @ p['out']['kernel'] + \
      p['out']['bias']
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dropout_masks_have_the_rate_and_differ_per_branch_row_and_key():
  key, rows = jax.random.PRNGKey(0), jnp.arange(64)
  keep, keep_prob = model_lib.keep_mask(key, rows, 0.1, (50, 40))
  keep = np.asarray(keep)
  n = keep.size
  assert abs(keep.mean() - keep_prob) < 4 * np.sqrt(0.09 / n)  # binomial bound
  assert abs(keep_prob - 0.9) < 1 / 65536
  assert len({r.tobytes() for r in keep}) == 64  # every row its own mask
  # Row r's mask depends on r, not on where r sits in the batch.
  again, _ = model_lib.keep_mask(key, rows[::-1], 0.1, (50, 40))
  np.testing.assert_array_equal(np.asarray(again)[::-1], keep)
  x = jnp.ones((64, 50, 40))
  drop = model_lib.Dropout(0.1)
  out = lambda branch, k=key: np.asarray(drop.apply({}, x, False, noise=(k, rows, branch)))
  np.testing.assert_allclose(out(0).mean(), 1.0, atol=4 * np.sqrt(0.1 / 0.9 / n))
  assert (out(0) != out(1)).mean() > 0.1  # branches: different masks (~18% of elements)
  np.testing.assert_array_equal(out(3), out(3))
  assert (out(0) != out(0, jax.random.PRNGKey(1))).mean() > 0.1  # steps: different keys


def _count_primitive(jaxpr, name):
  """Occurrences of primitive `name` in a jaxpr and every jaxpr nested in its equations."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          count += _count_primitive(inner, name)
  return count


def test_dropout_mask_bits_are_balanced_and_uncorrelated():
  """At rate 1/2 every mask element is one draw's top bit: over 64 rows of 4,001 elements
  (an odd count: the last word's second draw is cut) the bits are balanced, and neither
  neighbours in a row (lag 1: the two draws of one word; lag 2: adjacent words), nor rows
  next to each other, nor the same row under two keys, in two layers or in two branches agree
  more than chance."""
  key, rows = jax.random.key(0), jnp.arange(64)
  bits = np.asarray(model_lib.keep_mask(key, rows, 0.5, (4001,))[0], np.float64)
  centred = 2 * bits - 1  # +-1: the mean of a product is a correlation
  bound = lambda n: 4 / np.sqrt(n)  # 4 standard deviations of a mean of n independent +-1
  assert abs(centred.mean()) < bound(centred.size)
  for lag in (1, 2, 3):
    assert abs((centred[:, lag:] * centred[:, :-lag]).mean()) < bound(centred[:, lag:].size)
  assert abs((centred[1:] * centred[:-1]).mean()) < bound(centred[1:].size)
  # The same rows under another key, in another layer, in another branch.
  for other_key, layer, branch in ((jax.random.key(1), 0, None), (key, 1, None), (key, 0, 1)):
    other = 2 * np.asarray(model_lib.keep_mask(other_key, rows, 0.5, (4001,), layer, branch)[0],
                           np.float64) - 1
    assert abs((centred * other).mean()) < bound(centred.size)


def test_frozen_branches_run_without_dropout(images):
  """2 frozen + 2 trained branches draw exactly the masks of the 2 trained branches alone
  (the embedding's and theirs): none for the frozen ones. keep_mask turns its hash words
  into 16-bit draws with one bitcast per call, so bitcasts count the masks drawn."""
  def bits_drawn(frozen):
    model = ParaFormer(num_branches=2, num_frozen_branches=frozen, branch_depth=1,
                       dropout=0.5, **SMALL)
    params = model.init(jax.random.key(0), images[:1])['params']
    fn = lambda p, k: model.apply({'params': p}, images, True, rngs={'dropout': k})
    return _count_primitive(jax.make_jaxpr(fn)(params, jax.random.key(1)).jaxpr,
                            'bitcast_convert_type')
  assert bits_drawn(0) > 0 and bits_drawn(2) == bits_drawn(0)


@pytest.mark.parametrize('shape', [(7,), (5, 3), (3, 5, 7)], ids=['1d', '2d_odd', '3d'])
def test_elementwise_masks_are_the_packed_masks_bit_for_bit(shape):
  """The TPU's form of the mask (each element from its index) against the CPU's (a word per
  two elements, bitcast): the same bits, odd sizes (a last half-word) included."""
  key, rows = jax.random.key(3), jnp.arange(6) + 11
  for layer, branch in ((0, None), (12345, 2)):
    packed = model_lib.keep_mask(key, rows, 0.3, shape, layer, branch)
    elementwise = model_lib.keep_mask(key, rows, 0.3, shape, layer, branch, elementwise=True)
    assert packed[1] == elementwise[1]
    np.testing.assert_array_equal(np.asarray(packed[0]), np.asarray(elementwise[0]))


def test_the_accelerator_program_computes_what_the_cpus_does(images):
  """The model built for a TPU or GPU mesh (`platform='tpu'`: [batch, tokens, D] dense inputs,
  one einsum per q, k and v, elementwise masks, the MLP recomputed in the backward pass,
  the softmax keeping only its output), run here on the CPU, against the CPU's: the same
  parameter tree, and with dropout on the same logits and gradients (so the same masks)."""
  kwargs = dict(num_branches=2, branch_depth=1, dropout=0.2, branch_strategy='vmap', **SMALL)
  cpu, tpu = ParaFormer(platform='cpu', **kwargs), ParaFormer(platform='tpu', **kwargs)
  params = cpu.init(jax.random.key(0), images[:1])['params']
  assert (jax.tree.structure(tpu.init(jax.random.key(0), images[:1])['params']) ==
          jax.tree.structure(params))
  labels = jnp.arange(len(images)) % 10

  def loss_and_grads(model):
    def loss(p):
      logits = model.apply({'params': p}, images, True, rngs={'dropout': jax.random.key(1)})
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
    return jax.jit(jax.value_and_grad(loss))(params)

  (loss_cpu, grads_cpu), (loss_tpu, grads_tpu) = loss_and_grads(cpu), loss_and_grads(tpu)
  np.testing.assert_allclose(loss_tpu, loss_cpu, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads_tpu, grads_cpu)


def test_the_softmax_that_keeps_its_output_has_softmax_gradients():
  """`softmax_keeping_output` against jax.nn.softmax: equal values and gradients in float32;
  in bfloat16 (its backward pass reads the rounded output) within bfloat16's rounding of the
  float32 gradient."""
  scores = jax.random.normal(jax.random.key(0), (2, 3, 5, 7)) * 3
  g = jax.random.normal(jax.random.key(1), scores.shape)

  def grad(softmax, dtype):
    return jax.grad(lambda s: (softmax(s, dtype).astype(jnp.float32) * g).sum())(scores)

  exact = lambda s, dtype: jax.nn.softmax(s, axis=-1).astype(dtype)
  keeping = model_lib.softmax_keeping_output
  np.testing.assert_allclose(keeping(scores, jnp.float32), exact(scores, jnp.float32),
                             rtol=1e-6)
  np.testing.assert_allclose(grad(keeping, jnp.float32), grad(exact, jnp.float32),
                             rtol=1e-5, atol=1e-7)
  reference = grad(exact, jnp.float32)
  error = np.abs(grad(keeping, jnp.bfloat16) - reference).max()
  assert 0 < error <= 2 ** -7 * np.abs(reference).max()
