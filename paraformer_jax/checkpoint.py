"""Orbax checkpoints, kept behind this one small class (a move to Orbax v1 touches only it).

Each checkpoint holds two items: `state` (the TrainState pytree, restored onto whatever
shardings the abstract target carries, so a run can resume on a different mesh) and `meta`
(JSON: the stage and layout needed to build that target). Orbax writes into a temporary
directory and renames it when complete, so a half-written checkpoint is never listed.
"""
from __future__ import annotations

import contextlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from paraformer_jax import storage

BEST_METRIC = 'val_accuracy'


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, quota, permissions...)."""


class Checkpoints:
  """The last `keep` checkpoints plus (if `keep_best`) the best one by validation accuracy."""

  def __init__(self, directory, keep: int | None = 3, keep_best: bool = True,
               create: bool = True):
    """`directory`: local or remote (gs://...); `create=False` for a run only read from."""
    policies = [pp.LatestN(keep)]
    best = {}
    if keep_best:
      policies.append(pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                               keep_checkpoints_without_metrics=False))
      # best_fn makes Orbax write the metrics to disk, so the best survives restarts.
      best = dict(best_fn=lambda m: m[BEST_METRIC], best_mode='max')
    self.directory = storage.path(directory)
    # Each manager's own names for its cross-process barriers (Orbax's are the same for
    # every manager): a run's checkpoints/ and stages/ managers must never share one.
    multiprocessing = ocp.options.MultiprocessingOptions(
        barrier_sync_key_prefix=self.directory.name)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=pp.AnyPreservationPolicy(policies), create=create,
        multiprocessing_options=multiprocessing, **best)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, meta: dict, metrics: dict | None = None):
    """Starts writing `step` in the background; a failed write is raised by the next
    `save` or `wait`, as a CheckpointWriteError."""
    with self._write_errors_explained():
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)),
                         metrics=metrics, force=True)

  @contextlib.contextmanager
  def _write_errors_explained(self):
    """Turns Orbax's write errors (e.g. tensorstore's 'No space left on device') into one
    that says what survived and what to do.

    Orbax writes into a temporary directory and renames it only once complete, and deletes
    old checkpoints only after that, so a failed write leaves every earlier one intact.
    """
    try:
      yield
    except Exception as e:  # Orbax and tensorstore raise several types for an I/O error
      self._manager.reload()  # forget the failed step: list what is complete on disk
      latest = self._manager.latest_step()
      kept = (f'the last complete checkpoint, step {latest}, is intact' if latest is not None
              else 'no complete checkpoint exists yet')
      raise CheckpointWriteError(
          f'Writing a checkpoint to {self.directory} failed: {str(e).splitlines()[0]}\n'
          f'Nothing earlier was lost: {kept} (a half-written checkpoint is never restored). '
          f'If the disk or a quota is full, free space (or move the workdir); then rerun the '
          f'same command to resume.'
      ) from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def agreed_latest_step(self) -> int | None:
    """The latest complete checkpoint as process 0 lists it, the same on every process.

    Each process lists the directory itself, and a listing can be stale (gcsfs caches them
    without expiry; a shared filesystem may lag): left alone, hosts could resume from
    different steps. A process that does not see process 0's step stops, on every process,
    with a message naming it, instead of a hang in the restore's collectives.
    """
    latest = self.latest_step()
    if jax.process_count() == 1:
      return latest
    chosen = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if latest is None else latest)))
    if chosen >= 0 and chosen not in self._manager.all_steps():
      self._manager.reload()  # a stale listing: read the directory again
    sees = chosen < 0 or chosen in self._manager.all_steps()
    seen = np.asarray(multihost_utils.process_allgather(np.int32(sees))).reshape(-1)
    if not seen.all():
      missing = ', '.join(str(i) for i in np.flatnonzero(seen == 0))
      raise FileNotFoundError(
          f'Process 0 resumes from step {chosen} in {self.directory}, which process(es) '
          f'{missing} cannot read there (this process, {jax.process_index()}, lists steps '
          f'{self.all_steps()}). Every process must see the same --workdir: a bucket, or '
          f'one shared filesystem, not a local disk per host. Nothing was changed.')
    return None if chosen < 0 else chosen

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_or_latest_step(self) -> int | None:
    """best_step, else latest_step (None only when there is no checkpoint; step 0 counts)."""
    best = self.best_step()
    return self.latest_step() if best is None else best

  def best_step(self) -> int | None:
    """The step with the highest validation accuracy among those saved with metrics, of
    the latest checkpoint's stage: an earlier stage of a stagewise run is a smaller model,
    not a candidate for the run's result."""
    self._manager.wait_until_finished()
    latest = self._manager.latest_step()
    if latest is None:
      return None
    stage = self.meta(latest).get('stage', 0)
    scored = [(m[BEST_METRIC], step) for step in self._manager.all_steps()
              if (m := self._manager.metrics(step)) and BEST_METRIC in m
              and self.meta(step).get('stage', 0) == stage]
    return max(scored)[1] if scored else None

  def meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        'meta']

  def param_shapes(self, step: int) -> dict:
    """{"['embed']['patch']['kernel']": shape, ...} of the saved params, from metadata only."""
    prefix = "['params']"
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        self._manager.item_metadata(step)['state']):
      key = jax.tree_util.keystr(path)
      if key.startswith(prefix):
        shapes[key[len(prefix):]] = tuple(leaf.shape)
    return shapes

  def restore(self, step: int, abstract_state):
    """The state at `step`, laid out as `abstract_state` says (shapes, dtypes, shardings)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']

  def restore_params(self, step: int, mesh) -> dict:
    """The saved parameters, whatever run wrote them, replicated over `mesh` (for another
    run's use: its mesh may not split the saved stacks the way the writer's did)."""
    replicated = NamedSharding(mesh, P())
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                          self._manager.item_metadata(step)['state'])
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))['state']['params']

  def wait(self):
    with self._write_errors_explained():
      self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
