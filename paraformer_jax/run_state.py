"""A run's state: the stage plan, and the TrainState made, restored and extended on the mesh.

Everything here works with any number of processes: parameters are created, filled from
another run and extended inside jitted functions that take every array as an argument and
return it already sharded (a global array spanning processes can neither be read back to
the host with `device_get` nor be closed over as a constant).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from paraformer_jax import expand, finetune, optim, sharding, steps
from paraformer_jax.model import ParaFormer, merge_frozen


def build_model(config) -> ParaFormer:
  m = config.model
  return ParaFormer(num_classes=config.data.num_classes, patch_size=m.patch_size,
                    width=m.width, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                    num_branches=m.num_branches, branch_depth=m.branch_depth,
                    dropout=m.dropout, block_style=m.block_style, pool=m.pool,
                    posemb=m.posemb, pre_logits=m.pre_logits, head_zero_init=m.head_zero_init,
                    dtype=jnp.dtype(m.dtype), branch_strategy=m.branch_strategy,
                    param_init=m.param_init)


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Which branches each stage trains and freezes, and how long it runs."""
  config: object
  steps_per_epoch: int
  expand_frozen: int = 0  # branches of config.expand_from, frozen ahead of the new ones
  expand_classes: int = 0  # its classes, whose head rows (and the head's norm) stay frozen

  @property
  def stagewise(self):
    return self.config.training.mode == 'stagewise'

  @property
  def num_stages(self):
    if not self.stagewise:
      return 1
    return self.config.model.num_branches // self.config.training.branches_per_stage

  @property
  def passes(self):
    """Passes over the training split per epoch: lpa's LPA pass and full pass, else one."""
    return 2 if self.config.training.mode == 'lpa' else 1

  @property
  def warmup_steps(self):
    return int(self.config.training.warmup_epochs * self.passes * self.steps_per_epoch)

  @property
  def steps_per_stage(self):
    return self.config.training.epochs * self.passes * self.steps_per_epoch

  def lpa_pass(self, i: int) -> bool:
    """Whether step i of a stage is an LPA pass (lpa: even epochs) rather than a full step."""
    return self.config.training.mode == 'lpa' and (i // self.steps_per_epoch) % 2 == 0

  def model(self, stage: int) -> ParaFormer:
    if not self.stagewise:
      return build_model(self.config).clone(num_frozen_branches=self.expand_frozen,
                                            num_frozen_classes=self.expand_classes)
    per = self.config.training.branches_per_stage
    return build_model(self.config).clone(num_branches=per, num_frozen_branches=stage * per)

  def frozen_keys(self, stage: int) -> tuple:
    if self.expand_frozen:
      return ('frozen_branches', 'embed', 'frozen_head')
    if not self.stagewise or stage == 0:
      return ()
    t = self.config.training
    return (('frozen_branches',) + (() if t.train_embed_in_later_stages else ('embed',)) +
            (() if t.train_head_in_later_stages else ('head',)))


def state_shardings(abstract_state, mesh):
  """Branch stacks and their per-branch optimizer state over 'branch'; the rest replicated."""
  replicated = NamedSharding(mesh, P())
  by_branch = NamedSharding(mesh, P('branch'))
  return abstract_state.replace(
      step=replicated, rng=replicated,
      params=sharding.param_shardings(abstract_state.params, mesh),
      opt_state={'branches': jax.tree.map(lambda _: by_branch,
                                          abstract_state.opt_state['branches']),
                 'shared': jax.tree.map(lambda _: replicated,
                                        abstract_state.opt_state['shared'])})


def init_params(model, rng, image_shape):
  return model.init(rng, jnp.zeros((1, *image_shape)))['params']


# Every random stream of a run derives from one root key, PRNGKey(config.seed), by fold_in
# with its own id (never seed + k: seed s + 1 must not replay a stream of seed s).
STREAMS = {'init': 0, 'dropout': 1, 'data': 2, 'replay': 3}


def rng_stream(seed: int, name: str, *indices: int) -> jax.Array:
  """The key of stream `name` (indexed further, e.g. by stage) of the run with `seed`."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), STREAMS[name])
  for i in indices:
    key = jax.random.fold_in(key, i)
  return key


def stream_seed(seed: int, name: str, *indices: int) -> int:
  """An integer seed (for numpy and grain) from stream `name`."""
  return int(jax.random.bits(rng_stream(seed, name, *indices), dtype=jnp.uint32) >> 1)


def data_seed(seed: int, stage: int) -> int:
  """The integer seed of a stage's data order and augmentation (input_pipeline)."""
  return stream_seed(seed, 'data', stage)


def state_fn(plan, tx, stage, params_fn, step):
  """make(inputs) -> the TrainState of `stage`, with params_fn(inputs) as its parameters."""
  frozen_keys = plan.frozen_keys(stage)

  def make(inputs):
    params = params_fn(inputs)
    trained, _ = steps.split_params(params, frozen_keys)
    return steps.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                            opt_state=optim.init(tx, trained),
                            rng=rng_stream(plan.config.seed, 'dropout'))
  return make


def abstract_state(plan, tx, mesh, stage, image_shape):
  """Shapes, dtypes and shardings of a stage's state: the target of restores and AOT compiles."""
  model = plan.model(stage)
  make = state_fn(plan, tx, stage, lambda _: init_params(model, jax.random.PRNGKey(0),
                                                         image_shape), 0)
  shapes = jax.eval_shape(make, None)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, state_shardings(shapes, mesh))


class StateMaker:
  """Makes, restores and extends the TrainState of a run's stages on its mesh."""

  def __init__(self, config, plan: StagePlan, tx, mesh, image_shape):
    self.config, self.plan, self.tx, self.mesh = config, plan, tx, mesh
    self.image_shape = image_shape

  def _init_params(self, model, rng):
    return init_params(model, rng, self.image_shape)

  def _make(self, stage, params_fn, inputs, step):
    """The state, created already sharded: eval_shape for the layout, then a jitted make
    whose only inputs are `inputs` (global arrays, passed as arguments)."""
    make = state_fn(self.plan, self.tx, stage, params_fn, step)
    out = state_shardings(jax.eval_shape(make, inputs), self.mesh)
    return jax.jit(make, out_shardings=out)(inputs)

  def abstract(self, stage):
    return abstract_state(self.plan, self.tx, self.mesh, stage, self.image_shape)

  def initial(self):
    """Stage 0's state: fresh, or filled from config.init_from / config.expand_from."""
    model = self.plan.model(0)
    fresh = lambda: self._init_params(model, rng_stream(self.config.seed, 'init', 0))
    source = self.config.init_from or self.config.expand_from
    if not source:
      return self._make(0, lambda _: fresh(), None, step=0)
    pretrained, step = finetune.load_pretrained(source, self.mesh)
    fill = expand.expanded_params if self.config.expand_from else finetune.transfer
    logging.info('Parameters from %s (step %d)', source, step)
    return self._make(0, lambda p: fill(p, fresh()), pretrained, step=0)

  def extend(self, state, stage):
    """Stage `stage` from the end of stage-1: old branches frozen, fresh branches appended."""
    old_model = self.plan.model(stage - 1)
    new_model = self.plan.model(stage).clone(num_frozen_branches=0)
    fresh_rng = rng_stream(self.config.seed, 'init', stage)

    def params_fn(old_params):
      _, merged = merge_frozen(old_model, old_params)
      fresh = self._init_params(new_model, fresh_rng)
      return {'embed': merged['embed'], 'frozen_branches': merged['branches'],
              'branches': fresh['branches'], 'head': merged['head']}

    return self._make(stage, params_fn, state.params, step=int(state.step))

  def restore(self, ckpts, step):
    """(state, stage) of checkpoint `step` in `ckpts`, laid out on this mesh."""
    stage = ckpts.meta(step)['stage']
    abstract = self.abstract(stage)
    self._check_fits(ckpts, step, abstract.params)
    return ckpts.restore(step, abstract), stage

  def _check_fits(self, ckpts, step, abstract_params):
    """A clear error, before Orbax's, when the config's parameters are not the checkpoint's."""
    saved = ckpts.param_shapes(step)
    wanted = {jax.tree_util.keystr(p): tuple(a.shape)
              for p, a in jax.tree_util.tree_leaves_with_path(abstract_params)}
    problems = [f'{k}: checkpoint {saved.get(k)}, config {wanted.get(k)}'
                for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if not problems:
      return
    branches = {v[0] for k, v in saved.items() if k.startswith("['branches']")}
    raise ValueError(
        f'Checkpoint step {step} in {ckpts.directory} does not fit this config '
        f'({len(problems)} parameters differ; the checkpoint has {sorted(branches)} trained '
        f'branches, the config model.num_branches={self.config.model.num_branches}):\n  ' +
        '\n  '.join(problems[:5]) + '\nUse the config the checkpoint was trained with (see '
        'config.json beside it), or a new --workdir for a different model.')
