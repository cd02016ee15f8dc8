"""Several processes (one per host): starting them together, and stopping when one is lost.

A process that dies (kill -9, out of memory, a lost host) cannot tell the others. What they
see depends on the platform:
- on CPUs (gloo collectives) the next collective of a process that talks to it fails at once
  ("Connection closed by peer"): `lost_process` recognizes that error, and the program stops
  with a message naming the lost process and exit code EXIT_LOST_PROCESS;
- on TPUs and GPUs a collective with a dead peer does not fail; JAX's coordination service
  marks a process dead after HEARTBEAT_TIMEOUT_S without a heartbeat and then stops every
  process (its own message, "Task N heartbeat timeout"; exit by abort);
- when process 0, which hosts the coordination service, is lost, every other process stops
  at once (JAX's message: "the leader task was preempted/died").
In every case the checkpoints on disk are complete ones (a half-written checkpoint is never
restored) and the same command, started again on every process, resumes from the last one.

A process that stops on an error leaves without JAX's shutdown barrier (`exit_now`): that
barrier waits for every process, the lost one too, for up to SHUTDOWN_TIMEOUT_S.
"""
from __future__ import annotations

import os
import re
import sys

from absl import flags, logging

FLAGS = flags.FLAGS

# A process silent this long is dead. The heartbeats come from a thread of their own, so a
# long compile or a slow step does not count as silence; JAX's default is 100 s.
HEARTBEAT_TIMEOUT_S = 60
# How long a process that finished waits for the others at exit (JAX's default: 300 s).
SHUTDOWN_TIMEOUT_S = 60
EXIT_LOST_PROCESS = 75  # EX_TEMPFAIL: start again (every process) to resume

# What a collective raises on CPUs when a peer process has gone away.
_LOST_PEER = re.compile(r'Connection (?:closed|reset) by peer|Broken pipe|'
                        r'heartbeat timeout|Socket closed', re.IGNORECASE)


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


def several() -> bool:
  """Whether this program runs as one of several processes (without starting JAX)."""
  if 'jax' not in sys.modules:
    return False
  import jax
  from jax._src import distributed
  return distributed.global_state.client is not None and jax.process_count() > 1


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


def lost_message(e: BaseException, lost: str) -> str:
  import jax
  first = next((line for line in str(e).splitlines() if _LOST_PEER.search(line)), str(e))
  return (f'lost {lost} of this run ({first.strip()}): it died or its host went away, and '
          f'this process ({jax.process_index()} of {jax.process_count()}) stops too. The '
          f'checkpoints written so far are complete (a half-written one is never restored): '
          f'start every process again with the same command to resume from the last one.')


def exit_now(code: int):
  """Exits without JAX's shutdown barrier (which would wait for a process that is gone)."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)
