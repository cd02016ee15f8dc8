"""Orbax checkpoints, kept behind this one small class (a move to Orbax v1 touches only it).

Each checkpoint holds two items: `state` (the TrainState pytree, restored onto whatever
shardings the abstract target carries, so a run can resume on a different mesh) and `meta`
(JSON: the stage and layout needed to build that target). Orbax writes into a temporary
directory and renames it when complete, so a half-written checkpoint is never listed.
"""
from __future__ import annotations

import contextlib
import logging as py_logging
import re
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from paraformer_jax import storage

BEST_METRIC = 'val_accuracy'
CHECKSUMS = 'checksums'  # meta: the state's checksums as saved


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, quota, permissions...)."""


class DamagedCheckpoint(ValueError):
  """A checkpoint on disk that cannot be read back as it was written."""

  def __init__(self, step: int, directory, why: str):
    self.step, self.directory = step, directory
    super().__init__(f'checkpoint step {step} in {directory} is damaged: {why}')


@jax.jit
def checksums(tree):
  """{leaf: uint32} of a pytree of arrays: the wrapping sum of each element's bits times a
  hash of its index. Integer sums are exact in any order, so the figure is the same on any
  mesh and any number of processes, and a changed, lost or moved element changes it."""
  def one(a):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    uint = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(a, uint).astype(jnp.uint32)
    index = jnp.arange(a.size, dtype=jnp.uint32).reshape(a.shape)
    return (bits * (index * jnp.uint32(2654435761) + 1)).sum(dtype=jnp.uint32)
  return jax.tree.map(one, tree)


def _checksum_record(tree) -> dict:
  """{'[params][embed]...': int} for a checkpoint's meta (JSON)."""
  sums = checksums(tree)
  return {jax.tree_util.keystr(path): int(np.asarray(leaf.addressable_data(0)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(sums)}


def _write_failure(error: BaseException) -> str:
  """tensorstore's write error without its spec (a few thousand characters of JSON)."""
  text = ' '.join(str(error).split())
  found = re.search(r'Failed (?:writing|to write)[^:]*: "?([^"]+?)"?: (.*?)(?: \[|$)', text)
  if found:
    return f'{found.group(1)}: {found.group(2)}'
  return text.split(' [tensorstore_spec=')[0][:300]


def _damage(error: BaseException) -> str:
  """What tensorstore, Orbax or the JSON reader said, as one short clause: the innermost
  cause that names the array, else the first line of the error."""
  chain, e = [], error
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in reversed(chain):
    text = ' '.join(str(e).split())
    found = re.search(r'Error reading "([^"]+)" in [^"]*"([^"]*)"[^:]*: (.*)', text)
    if found:
      return f'{found.group(2)} holds array {found.group(1)}: {found.group(3)[:160]}'
  first = (str(chain[-1]).strip().splitlines() or [''])[0]
  return f'{type(chain[-1]).__name__}: {first[:200]}'


class _NeverRetrieved(py_logging.Filter):
  """The errors of a failed read or write, which asyncio logs again, each with a traceback,
  when the futures of the other arrays' reads or writes are collected."""

  def filter(self, record):
    return 'exception was never retrieved' not in record.getMessage()


def _quiet_unraisable(unraisable, _default=sys.unraisablehook):
  """After a failed read or write, Orbax's pending reads and writes of the same checkpoint
  end later in closed event loops, each printing a traceback (hundreds to thousands of
  lines) that says nothing the one error (DamagedCheckpoint, CheckpointWriteError) does not."""
  text = f'{unraisable.exc_value} {unraisable.object!r}'
  if ('Event loop is closed' in text or '_read_array_index_and_device_put' in text or
      'write_fragment' in text):
    return
  _default(unraisable)


def _quiet_threads(args, _default=threading.excepthook):
  if 'Event loop is closed' in str(args.exc_value):
    return
  _default(args)


def _quiet_failed_io():
  """Installs the filters above (once): Orbax's and asyncio's echoes of a failed read or
  write, never the error itself, which reaches the caller."""
  if sys.unraisablehook is not _quiet_unraisable:
    sys.unraisablehook = _quiet_unraisable
    threading.excepthook = _quiet_threads
    py_logging.getLogger('asyncio').addFilter(_NeverRetrieved())


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
    _quiet_failed_io()
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
    meta = {**meta, CHECKSUMS: _checksum_record(state)}
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
          f'Writing a checkpoint to {self.directory} failed: {_write_failure(e)}\n'
          f'Nothing earlier was lost: {kept}; {self._remove_unfinished()}. If the disk or a '
          f'quota is full, free space (or move the workdir); then rerun the same command to '
          f'resume.'
      ) from e

  def _remove_unfinished(self) -> str:
    """Removes what a failed write left (Orbax's temporary directories; a rerun would only
    ignore them) to give the space back; says what was done."""
    left = sorted(self.directory.glob('*.orbax-checkpoint-tmp*'))
    if not left:
      return 'nothing half-written was left'
    names = ', '.join(p.name for p in left)
    if jax.process_index():
      return f'process 0 removes the half-written {names}'
    try:
      for p in left:
        p.rmtree()
    except OSError as e:
      return f'the half-written {names} could not be removed ({e}): delete it'
    return f'the half-written {names} was removed'

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

  @contextlib.contextmanager
  def _reading(self, step: int):
    """Any error reading `step` (a truncated or missing file, bad JSON) as DamagedCheckpoint."""
    try:
      yield
    except DamagedCheckpoint:
      raise
    except Exception as e:  # noqa: BLE001 (tensorstore, Orbax and json raise many types)
      raise DamagedCheckpoint(step, self.directory, _damage(e)) from e

  def meta(self, step: int) -> dict:
    with self._reading(step):
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
          'meta']
      if not isinstance(meta, dict):
        raise ValueError(f'its meta item is {type(meta).__name__}, not a JSON object')
      return meta

  def _item_metadata(self, step: int):
    with self._reading(step):
      return self._manager.item_metadata(step)['state']

  def _verified(self, step: int, restored, prefix: str = ''):
    """`restored`, once its checksums equal those saved with it (checkpoints written before
    checksums were kept are taken as read)."""
    saved = self.meta(step).get(CHECKSUMS)
    if saved is None:
      return restored
    got = _checksum_record(restored)
    bad = [k for k, v in got.items() if saved.get(prefix + k, v) != v]
    if bad:
      raise DamagedCheckpoint(step, self.directory,
                              f'{len(bad)} arrays read back other than written ({bad[0]}, ...)')
    return restored

  def param_shapes(self, step: int) -> dict:
    """{"['embed']['patch']['kernel']": shape, ...} of the saved params, from metadata only."""
    prefix = "['params']"
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(self._item_metadata(step)):
      key = jax.tree_util.keystr(path)
      if key.startswith(prefix):
        shapes[key[len(prefix):]] = tuple(leaf.shape)
    return shapes

  def restore(self, step: int, abstract_state):
    """The state at `step`, laid out as `abstract_state` says (shapes, dtypes, shardings);
    DamagedCheckpoint if it cannot be read back as written."""
    with self._reading(step):
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))['state']
    return self._verified(step, state)

  def restore_params(self, step: int, mesh) -> dict:
    """The saved parameters, whatever run wrote them, replicated over `mesh` (for another
    run's use: its mesh may not split the saved stacks the way the writer's did)."""
    replicated = NamedSharding(mesh, P())
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
                          self._item_metadata(step))
    with self._reading(step):
      params = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))['state']['params']
    return self._verified(step, params, prefix=".params")

  def move_aside(self, step: int):
    """Renames damaged checkpoint `step` to damaged-STEP beside the others (never deleted;
    Orbax lists only step numbers, so it is no longer restored); returns the new path."""
    source = self.directory / str(step)
    target = self.directory / f'damaged-{step}'
    n = 1
    while target.exists():
      n += 1
      target = self.directory / f'damaged-{step}-{n}'
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'moved aside {source}')
    self._manager.reload()
    return target

  def wait(self):
    with self._write_errors_explained():
      self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
