"""Several processes (one per host): starting them together, and stopping when one is lost.

A process that dies (kill -9, out of memory, a lost host) cannot tell the others, and a
collective with a dead peer may wait: on TPUs and GPUs always, on CPUs (gloo) sometimes
(other times it fails at once, "Connection closed by peer", which `lost_process`
recognizes). JAX's coordination service marks a process dead after HEARTBEAT_TIMEOUT_S
without a heartbeat and then aborts every process with its own message, which cannot say
how to go on. So each process also beats in JAX's key-value store (`Watchdog`), and a process
that sees another silent for LOST_AFTER_S stops first, with a message naming it and exit
code EXIT_LOST_PROCESS. When process 0, which hosts the coordination service, is lost, JAX
stops every other process at once (its message: "the leader task was preempted/died").
In every case the checkpoints on disk are complete ones (a half-written checkpoint is never
restored) and the same command, started again on every process, resumes from the last one.

A process that stops on an error leaves without JAX's shutdown barrier (`exit_now`): that
barrier waits for every process, the lost one too, for up to SHUTDOWN_TIMEOUT_S.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time

from absl import flags, logging

FLAGS = flags.FLAGS

# A process silent this long is dead. The beats come from threads of their own, so a long
# compile or a slow step is not silence. Ours (the message) come before JAX's (the abort;
# JAX's default is 100 s).
BEAT_S = 2
LOST_AFTER_S = 20
HEARTBEAT_TIMEOUT_S = 60
# How long a process that finished waits for the others at exit (JAX's default: 300 s).
SHUTDOWN_TIMEOUT_S = 60
EXIT_LOST_PROCESS = 75  # EX_TEMPFAIL: start again (every process) to resume

# What a collective raises on CPUs when a peer process has gone away.
_LOST_PEER = re.compile(r'Connection (?:closed|reset) by peer|Broken pipe|'
                        r'heartbeat timeout|Socket closed|'
                        r'Gloo context initialization failed', re.IGNORECASE)


def define_flags():
  flags.DEFINE_bool('distributed', False,
                    'Call jax.distributed.initialize(): one process per host. On TPU pods and '
                    'SLURM the coordinator is found automatically; elsewhere pass the next '
                    'three.')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0 (implies --distributed).')
  flags.DEFINE_integer('num_processes', None,
                       'Number of processes (with --coordinator_address).')
  flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')


def start():
  """jax.distributed.initialize with this module's timeouts, when the flags ask for it."""
  if not (FLAGS.distributed or FLAGS.coordinator_address):
    return
  import jax
  # CPU collectives across processes (tests, CPU clusters); GPU and TPU ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                             heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                             shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1:
    Watchdog().start()


_ALIVE = 'paraformer_jax/alive/'


class Watchdog(threading.Thread):
  """Beats every BEAT_S (a counter under _ALIVE in JAX's key-value store: no clocks compared
  across hosts) and stops this process when another has not beaten for LOST_AFTER_S. A
  process that ends normally writes 'done' instead (`finished`), and is not waited for."""

  def __init__(self):
    super().__init__(daemon=True, name='paraformer_watchdog')
    import jax
    self.client, self.me = _client(), jax.process_index()
    self.count = 0

  def run(self):
    last = {}  # process -> (its counter, when it last changed here)
    while True:
      self.count += 1
      try:
        self.client.key_value_set(f'{_ALIVE}{self.me}', str(self.count), allow_overwrite=True)
        beats = self.client.key_value_dir_get(_ALIVE)
      except Exception:  # noqa: BLE001 (the coordination service is gone: JAX stops us)
        return
      now = time.monotonic()
      for key, value in beats:
        process = int(key.rsplit('/', 1)[1])
        if value == 'done' or process == self.me:
          last.pop(process, None)
          continue
        if process not in last or last[process][0] != value:
          last[process] = (value, now)
        elif now - last[process][1] > LOST_AFTER_S:
          print('error: ' + lost_message(f'process {process}',
                                         f'no sign of it for {LOST_AFTER_S} s'),
                file=sys.stderr, flush=True)
          exit_now(EXIT_LOST_PROCESS)
      time.sleep(BEAT_S)


def finished():
  """Tells the other processes' watchdogs that this one ends normally (not lost)."""
  if several():
    import jax
    try:
      _client().key_value_set(f'{_ALIVE}{jax.process_index()}', 'done', allow_overwrite=True)
    except Exception:  # noqa: BLE001 (the service is gone already)
      pass


def _client():
  """jax.distributed's client (its key-value store), or None when it was not started."""
  if 'jax' not in sys.modules:  # never start JAX only to ask
    return None
  from jax._src import distributed
  return distributed.global_state.client


def several() -> bool:
  """Whether this program runs as one of several processes."""
  if _client() is None:
    return False
  import jax
  return jax.process_count() > 1


def lost_process(e: BaseException) -> str | None:
  """'process 1' (or 'the process at ADDRESS') when `e` is a collective that failed because
  another process went away; None for any other error."""
  text = str(e)
  if not several() or not _LOST_PEER.search(text):
    return None
  import jax
  if jax.process_count() == 2:
    return f'process {1 - jax.process_index()}'
  address = re.search(r'\[([0-9a-fA-F.:]+)\]:\d+', text)
  return f'the process at {address.group(1)}' if address else 'another process'


def error_cause(e: BaseException) -> str:
  """The line of a lost-peer error that says so."""
  return next((line for line in str(e).splitlines() if _LOST_PEER.search(line)),
              str(e)).strip()


def lost_message(lost: str, cause: str) -> str:
  import jax
  return (f'lost {lost} of this run ({cause}): it died or its host went away, and this '
          f'process ({jax.process_index()} of {jax.process_count()}) stops too. The '
          f'checkpoints written so far are complete (a half-written one is never restored): '
          f'start every process again with the same command to resume from the last one.')


def exit_now(code: int):
  """Exits without JAX's shutdown barrier (which would wait for a process that is gone),
  stopping this process's input workers first (os._exit skips multiprocessing's own exit
  handler, and a grain worker outlives its parent)."""
  import multiprocessing
  for child in multiprocessing.active_children():
    child.terminate()
  for child in multiprocessing.active_children():
    child.join(5)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)
