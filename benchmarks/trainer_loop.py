"""What the training loop costs on top of its step, in one run of the same config and steps.

  (a) step   the trainer's jitted step in a tight loop over batches already on the device
  (b) input  the input pipeline alone, as the config runs it (its workers), host batches
  (c) loop   the Trainer's own loop (train.StageLoop) fed from an in-memory list of the same
             host batches: its syncs, logging and transfers, no validation or checkpoint
  (d) main   the same loop as `main` runs it: the real input pipeline, validation and
             checkpoints at the config's intervals (their times are printed beside it)

Every measurement covers the last --steps steps of the config's first stage (so the loop's
validations and saves fall where the config puts them) and starts from a fresh state; the
programs are compiled in a warm-up round that is not counted. Images/s are medians of
--rounds rounds, the four measured one after another in each round (a shared machine drifts),
with their range. The ratios: c/a (the loop's own cost; on an accelerator it should be >= 0.97)
and d/min(a, b) (on a CPU the input and the step share the cores, so only an accelerator can
show d near min(a, b)).

Configs: `digits` (configs/digits.py, the embedded data) and `cifar32` (the paper's model and
recipe, configs/cifar10.py:32px, on CIFAR-10-shaped crops of two sample photos written to a
temporary dir: the pipeline's work per image is CIFAR's). --processes=2 runs the same in two
processes (gloo, one CPU device each). The last line sums it up for scripts:
  trainer_loop: c/a=<worst> d/min(a,b)=<worst>

  .venv/bin/python benchmarks/trainer_loop.py                      # digits and cifar32, 1 and 2
  .venv/bin/python benchmarks/trainer_loop.py --configs=digits --processes=1
  .venv/bin/python benchmarks/trainer_loop.py --configs=cifar32 --batch=64 --steps=12
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Defaults per config: steps per measurement and the batch (None: the config's). The paper's
# batch of 500 at 32 px takes ~10 s a step on 2 CPU cores; 64 keeps a round near a minute.
DEFAULTS = {'digits': (150, None), 'cifar32': (12, 64)}


def _config(name, data_dir, batch):
  from configs import cifar10, digits
  config = digits.get_config() if name == 'digits' else cifar10.get_config('32px')
  config.data.data_dir = data_dir
  if batch:
    config.training.batch_size = batch
  config.mesh.data, config.mesh.branch = -1, 1
  return config


class Timed:
  """Wraps a Trainer method, recording how long each call took (blocking on its result)."""

  def __init__(self, fn):
    self.fn, self.seconds = fn, []

  def __call__(self, *args, **kwargs):
    import jax
    start = time.perf_counter()
    out = jax.block_until_ready(self.fn(*args, **kwargs))
    self.seconds.append(time.perf_counter() - start)
    return out


def _measure(args):
  """One process's rounds; process 0 prints its result as JSON."""
  import itertools

  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  processes = int(args.processes)
  if processes > 1:
    jax.distributed.initialize(f'127.0.0.1:{args.port}', processes, args.process_id)
  from absl import logging
  from paraformer_jax import reporting, train
  from paraformer_jax.preemption import Preemption
  logging.set_verbosity(logging.WARNING)  # the loop's progress lines are not timed output

  config = _config(args.configs, args.data_dir, args.batch)
  trainer = train.Trainer(config, os.path.join(args.workdir, 'warmup'))
  trainer.open_for_writing()
  plan, n = trainer.plan, args.steps
  start = plan.steps_per_stage - n
  images = n * config.training.batch_size
  step_fn = trainer.stage_step(0)

  def fresh_state():
    state = trainer.states.initial()
    return state.replace(step=jax.device_put(jax.numpy.int32(start), state.step.sharding))

  data = trainer.stage_batches(0, start)
  host = list(itertools.islice(data, n))
  data.close()

  def bare():
    state, batches = fresh_state(), [trainer.device_batch(b) for b in host]
    jax.block_until_ready((state, batches))
    t = time.perf_counter()
    for i, batch in enumerate(batches):
      state, _ = step_fn(state, batch, lpa_pass=plan.lpa_pass(start + i))
    jax.block_until_ready(state)
    return time.perf_counter() - t

  def input_alone():
    t = time.perf_counter()
    data = trainer.stage_batches(0, start)
    for _ in itertools.islice(data, n):
      pass
    seconds = time.perf_counter() - t
    data.close()
    return seconds

  def loop(batches, workdir, in_memory):
    """Seconds of StageLoop.run over n steps, and the validation and save times inside."""
    trainer.workdir = trainer.workdir.parent / workdir
    trainer.open_for_writing()
    validate, save = Timed(train.Trainer.validate_and_save.__get__(trainer)), Timed(
        trainer.ckpts.save)
    if in_memory:  # (c): the loop alone; the last step's validation only stops the clock
      trainer.validate_and_save = lambda stage, state, writer: validate.seconds.append(0.0)
      trainer.config.checkpoint_every_minutes = 0
    else:
      trainer.validate_and_save, trainer.ckpts.save = validate, save
    state, writer = fresh_state(), reporting.MetricWriter(trainer.workdir)
    jax.block_until_ready(state)
    t = time.perf_counter()
    with Preemption() as preemption:
      state = train.StageLoop(trainer, 0, writer, preemption).run(state, step_fn, batches)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t
    trainer.ckpts.wait()
    writer.close()
    del trainer.validate_and_save
    trainer.config.checkpoint_every_minutes = config_minutes
    return seconds, validate.seconds, save.seconds

  config_minutes = config.checkpoint_every_minutes
  rounds = {k: [] for k in 'abcd'}
  extra = {}
  for r in range(args.rounds + 1):  # round 0 compiles
    a = bare()
    b = input_alone()
    c, _, _ = loop(iter(host), f'c{r}', in_memory=True)
    data = trainer.stage_batches(0, start)
    try:
      d, validations, saves = loop(data, f'd{r}', in_memory=False)
    finally:
      data.close()
    if r:
      for k, v in zip('abcd', (a, b, c, d)):
        rounds[k].append(images / v)
      extra = {'validations': validations, 'saves': saves}
  if jax.process_index() == 0:
    print(json.dumps({'rounds': rounds, **extra, 'steps': n, 'start': start,
                      'batch': config.training.batch_size, 'devices': jax.device_count(),
                      'mode': config.training.mode, 'dropout': config.model.dropout}))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(name, processes, args, data_dir, workdir):
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'),
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  steps, batch = DEFAULTS[name]
  cmd = [sys.executable, __file__, '--worker', f'--configs={name}',
         f'--processes={processes}', f'--port={port}', f'--rounds={args.rounds}',
         f'--steps={args.steps or steps}', f'--batch={args.batch or batch or 0}',
         f'--data_dir={data_dir}', f'--workdir={workdir}']
  procs = [subprocess.Popen(cmd + [f'--process_id={i}'], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  outs = [p.communicate(timeout=3600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f'{name} on {processes} process(es) failed:\n{err[-3000:]}')
  return json.loads(outs[0][0].strip().splitlines()[-1])


def _summary(values):
  return f'{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default='digits,cifar32')
  parser.add_argument('--processes', default='1,2', help='process counts to run, e.g. 1,2')
  parser.add_argument('--steps', type=int, default=0, help='steps per measurement '
                      '(0: digits 150, cifar32 12)')
  parser.add_argument('--batch', type=int, default=0, help="0: digits the config's, cifar32 64")
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--process_id', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--port', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--data_dir', default='', help=argparse.SUPPRESS)
  parser.add_argument('--workdir', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return _measure(args)

  worst = {'c/a': float('inf'), 'd/min(a,b)': float('inf')}
  print('| config | processes | batch | steps | (a) step img/s | (b) input | (c) loop | '
        '(d) main | c/a | d/min(a,b) | validations, saves in (d) |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.configs.split(','):
      data_dir = os.path.join(tmp, 'tfds')
      if name == 'cifar32':
        from paraformer_jax.datasets import sample_photos
        sample_photos.write_cifar10(data_dir)
      for processes in (int(p) for p in args.processes.split(',')):
        r = _spawn(name, processes, args, data_dir, os.path.join(tmp, f'{name}{processes}'))
        med = {k: statistics.median(v) for k, v in r['rounds'].items()}
        ca, dab = med['c'] / med['a'], med['d'] / min(med['a'], med['b'])
        worst = {'c/a': min(worst['c/a'], ca), 'd/min(a,b)': min(worst['d/min(a,b)'], dab)}
        cost = lambda s: f'{len(s)} x {statistics.mean(s):.2f} s' if s else '0'
        print(f"| {name} ({r['mode']}, dropout {r['dropout']:g}) | {processes} | {r['batch']} | "
              f"{r['steps']} | " + ' | '.join(_summary(r['rounds'][k]) for k in 'abcd') +
              f" | {ca:.3f} | {dab:.3f} | {cost(r['validations'])}, {cost(r['saves'])} |",
              flush=True)
  print(f"trainer_loop: c/a={worst['c/a']:.3f} d/min(a,b)={worst['d/min(a,b)']:.3f}")


if __name__ == '__main__':
  main()
