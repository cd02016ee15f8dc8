"""Branch-sharded execution: a ('data', 'branch') mesh, sharded parameters, shard_map forward.

Branch parameters are split on their leading axis over 'branch', everything else is
replicated, and the batch is split over 'data'. Each device applies its local branches and a
`psum` over 'branch' forms the sum (see `ParaFormer.branch_axis`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from paraformer_jax.model import ParaFormer

MESH_AXES = ('data', 'branch')


def make_mesh(data: int = -1, branch: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'branch') mesh over all devices (or `devices`); data=-1 takes what is left."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1:
    if branch < 1 or n % branch:
      raise ValueError(f'config.mesh.branch={branch} does not divide the {n} devices; pick a '
                       f'divisor of {n}, or on a CPU make {branch} devices with XLA_FLAGS='
                       f'--xla_force_host_platform_device_count={branch} (set before Python '
                       f'starts).')
    data = n // branch
  if data * branch != n:
    raise ValueError(f'mesh (data={data}, branch={branch}) needs {data * branch} devices but '
                     f'{n} are available. Set config.mesh.data=-1 to use them all; on a CPU, '
                     f'XLA_FLAGS=--xla_force_host_platform_device_count={data * branch} (set '
                     f'before Python starts) makes {data * branch} devices.')
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  try:
    return jax.make_mesh((data, branch), MESH_AXES, axis_types=axis_types, devices=devices)
  except AssertionError:
    # jax.make_mesh's physical layout wants one device per chip, which libtpu's topology
    # descriptions of v4 slices (the ahead-of-time check) are not: take them in order.
    return jax.sharding.Mesh(np.asarray(devices).reshape(data, branch), MESH_AXES,
                             axis_types=axis_types)


def check_divisible(model: ParaFormer, mesh, batch_size: int | None = None):
  """Refuse, before anything compiles, shapes the mesh cannot split evenly."""
  nb = mesh.shape['branch']
  for what, n in (('num_branches', model.num_branches),
                  ('frozen branches', model.num_frozen_branches)):
    if n % nb:
      divisors = [d for d in range(1, n + 1) if n % d == 0]
      raise ValueError(
          f'{what}={n} is not divisible by the mesh branch axis size {nb}. Use a branch count '
          f'(and, stagewise, branches_per_stage) that is a multiple of {nb}, or a branch axis '
          f'size in {divisors}.')
  if batch_size is not None and batch_size % mesh.shape['data']:
    raise ValueError(f'batch size {batch_size} is not divisible by the mesh data axis size '
                     f'{mesh.shape["data"]}; use a multiple of it.')


BRANCH_STACKS = ('branches', 'frozen_branches')


def param_specs(params):
  """PartitionSpecs: the leading (branch) axis of each branch stack over 'branch'."""
  return {name: jax.tree.map(lambda _: P('branch') if name in BRANCH_STACKS else P(), sub)
          for name, sub in params.items()}


def param_shardings(params, mesh):
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params))


def params_to_host(params):
  """The whole of every parameter as numpy, on every process (a global array spanning
  processes cannot be read with `jax.device_get`: the other processes hold parts of it)."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(params, tiled=True)


def params_to_mesh(params, mesh):
  """Host parameters, the same on every process, as global arrays sharded over `mesh`."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(
      np.shape(x), s, lambda index: np.asarray(x)[index]), params, param_shardings(params, mesh))


def init_params(model: ParaFormer, mesh, rng, image_shape):
  """Parameters created already sharded: eval_shape for the layout, then a jitted init."""
  check_divisible(model, mesh)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  init = lambda r: model.init(r, dummy)['params']
  shardings = param_shardings(jax.eval_shape(init, rng), mesh)
  return jax.jit(init, out_shardings=shardings)(rng)


def local_model(model: ParaFormer, mesh) -> ParaFormer:
  """The module one device runs inside shard_map: its local branches, summed over 'branch'."""
  check_divisible(model, mesh)
  nb = mesh.shape['branch']
  return model.clone(num_branches=model.num_branches // nb,
                     num_frozen_branches=model.num_frozen_branches // nb, branch_axis='branch',
                     data_axis='data', platform=mesh.devices.flat[0].platform)


def sharded_apply(model: ParaFormer, mesh, method: str = '__call__'):
  """fn(params, images, train=False, dropout_rng=None) -> logits, run under jax.shard_map.

  `method='prefix_logits'` gives [L, batch, classes] (batch axis 1 sharded over 'data').
  """
  local = local_model(model, mesh)
  out_spec = P(None, 'data') if method == 'prefix_logits' else P('data')

  def apply(params, images, train=False, dropout_rng=None):
    def body(params, images, *rng):
      # One key everywhere: the model folds in each example's and branch's global index.
      rngs = {'dropout': rng[0]} if rng else {}
      return local.apply({'params': params}, images, train, rngs=rngs,
                         method=getattr(ParaFormer, method))
    rng = () if dropout_rng is None else (dropout_rng,)
    specs = (param_specs(params), P('data')) + (P(),) * len(rng)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_spec)(
        params, images, *rng)

  return apply


def data_shard(mesh) -> tuple[int, int]:
  """(index, count): which of `count` equal slices of every global batch this process loads.

  A process loads the rows its devices hold on the 'data' axis. Processes whose devices
  cover the same rows (e.g. when only 'branch' spans processes) load the same examples.
  """
  rows = {}
  for (i, _), device in np.ndenumerate(mesh.devices):
    rows.setdefault(device.process_index, set()).add(i)
  groups = sorted({tuple(sorted(r)) for r in rows.values()})
  sizes = {len(g) for g in groups}
  if len(sizes) != 1 or sum(len(g) for g in groups) != mesh.shape['data']:
    raise ValueError(f'The processes hold uneven parts of the mesh data axis ({groups}); use '
                     f'a mesh whose data axis splits evenly over the {jax.process_count()} '
                     f'processes.')
  return groups.index(tuple(sorted(rows[jax.process_index()]))), len(groups)


def global_batch(mesh, local_batch):
  """A global array, batch split over 'data', from this process's slice of the batch.

  On one process this is just a device_put; on several (TPU pod, multi-node GPU) every
  process passes the rows of its `data_shard` and the result spans all of them.
  """
  sharding = NamedSharding(mesh, P('data'))
  count = data_shard(mesh)[1]
  if jax.process_count() == 1:  # one call for the whole batch: half the host time per step
    return jax.device_put(local_batch, sharding)

  def make(a):
    a = np.asarray(a)
    return jax.make_array_from_process_local_data(sharding, a, (a.shape[0] * count,) + a.shape[1:])
  return jax.tree.map(make, local_batch)
