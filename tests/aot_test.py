"""The ahead-of-time compile check."""
import importlib.util
import os
import re
import subprocess
import sys

import jax
import pytest

from configs import tiny
from paraformer_jax import aot, chips, flops, optim, run_state, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compiles_a_sharded_train_step_and_counts_its_flops():
  config = tiny.get_config()
  config.training.mode = 'joint'
  config.mesh.data, config.mesh.branch = 4, 2
  result = aot.compile_train_step(config, channels=1)
  assert result['mesh'] == {'data': 4, 'branch': 2} and result['devices'] == 8
  # The arguments per device are at least the state's share: the branch stack is split
  # over 2 devices, each device holds the rest whole.
  assert result['argument_bytes'] > 0 and result['temp_bytes'] > 0
  # XLA's FLOPs per device against the analytic count of the work done: a training step is
  # ~3x forward, over batch / 4 rows and half the branches (plus softmax, norms, Adam: a
  # bounded surplus).
  half = run_state.build_model(config).clone(num_branches=2)
  per_device = 3 * flops.forward_flops(half, config.data.image_size, 1, executed=True) * (
      config.training.batch_size / 4)
  assert 0.9 * per_device < result['flops'] < 1.4 * per_device


def test_an_indivisible_mesh_fails_before_compiling():
  env = dict(os.environ, XLA_FLAGS='')
  out = subprocess.run([sys.executable, '-m', 'paraformer_jax.aot', '--config=configs/tiny.py',
                        '--devices=6', '--config.mesh.branch=3'], cwd=REPO, env=env,
                       capture_output=True, text=True)
  assert out.returncode != 0
  assert 'num_branches=4 is not divisible by the mesh branch axis size 3' in out.stderr


# The real TPU compiler (libtpu), for a v5e 2x2 slice described by libtpu: no TPU needed.
@pytest.fixture(scope='module')
def v5e():
  return aot.tpu_devices('v5e:2x2')


def _tpu_config():
  config = tiny.get_config()
  config.training.mode = 'joint'
  config.mesh.branch = 2  # 2 of the 4 branches per device, batch over the other 2
  return config


def test_a_tpu_compile_takes_the_tpu_paths_and_measures_per_chip_memory(v5e):
  config = _tpu_config()
  tpu = aot.compile_train_step(config, channels=1, devices=v5e)
  assert (tpu['platform'], tpu['device_kind'], tpu['devices']) == ('tpu', 'TPU v5 lite', 4)
  # Decided by the target, not by this CPU host: fused branches, XLA's attention.
  assert 'branches_fused' in tpu['program'] and 'attention_accelerator' in tpu['program']
  assert 'branches_vmap' not in tpu['program'] and 'attention_einsum' not in tpu['program']
  cpu = aot.compile_train_step(config, channels=1, devices=jax.devices()[:4])
  assert 'attention_einsum' in cpu['program'] and 'attention_accelerator' not in cpu['program']
  # Per chip, the arguments hold at least this device's share of the state and of the batch
  # (TPU layouts pad to tiles, so not exactly), and the donated state is reused.
  plan = run_state.StagePlan(config, 1000)
  state = run_state.abstract_state(plan, optim.make_tx(config.training, 1000),
                                   sharding.make_mesh(-1, 2, v5e), 0, (8, 8, 1))
  share = sum(a.size * a.dtype.itemsize // (2 if a.sharding.spec and a.sharding.spec[0] ==
                                            'branch' else 1) for a in jax.tree.leaves(state))
  batch = config.training.batch_size // 2 * (8 * 8 * 1 * 4 + 4)
  assert share + batch <= tpu['argument_bytes'] < 4 * (share + batch)
  assert tpu['alias_bytes'] >= share
  assert tpu['peak_bytes'] < aot.chip_hbm_bytes(v5e, 'v5e:2x2')
  # The roofline's inputs: the step reads every parameter and Adam moment of its share.
  assert tpu['flops'] > 0 and tpu['bytes_accessed'] >= share


def test_chip_memory_is_the_chips_hbm_shared_by_its_devices(v5e):
  assert aot.chip_hbm_bytes(v5e, 'v5e:2x2') == 16 * 2**30  # one device per v5e chip
  v4 = aot.tpu_devices('v4:2x2x1')  # 4 chips, 2 devices (cores) each
  assert len(v4) == 8 and aot.chip_hbm_bytes(v4, 'v4:2x2x1') == 16 * 2**30


@pytest.mark.parametrize('capacity', [5_000, 40_000, 10**9, 10])
def test_the_largest_batch_that_fits_is_found(monkeypatch, capacity):
  """The search against a memory curve like a TPU's: affine, padded in steps of 8 rows per
  device, with a bump at small batches (so the first guess is off); brute force decides."""
  config = _tpu_config()  # mesh (data 2, branch 2) on 4 devices: batches in steps of 2
  peak = lambda b: 3_000 + 10 * (-(-b // 2 // 8) * 8) + (700 if b <= 8 else 0)
  compiles = []

  def fake_compile(config, channels, devices, batch):
    compiles.append(batch)
    result = {'peak_bytes': peak(batch), 'batch': batch, 'mesh': {'data': 2, 'branch': 2},
              'out_of_memory': None, 'argument_bytes': 0, 'output_bytes': 0,
              'alias_bytes': 0, 'temp_bytes': peak(batch)}
    if peak(batch) > 2 * capacity:  # refused by the compiler, its message without sizes
      result.update(out_of_memory={'needed_bytes': None, 'available_bytes': None},
                    peak_bytes=None)
    return result
  monkeypatch.setattr(aot, 'compile_train_step', fake_compile)
  batch, result = aot.largest_batch(config, capacity, 1, jax.devices()[:4],
                                    log=lambda line: None)
  bound = aot.MAX_BATCH_PER_DEVICE * 2
  fitting = [b for b in range(2, bound + 1, 2) if peak(b) <= capacity]
  if not fitting:
    assert batch == 0
    return
  assert result['batch'] == batch and peak(batch) <= capacity
  assert batch == max(fitting)  # the curve is monotonic beyond the bump: the true largest
  assert len(compiles) == len(set(compiles)) <= 40  # each batch compiled once, a few dozen


def test_bad_topologies_and_a_missing_libtpu_are_explained(monkeypatch):
  with pytest.raises(ValueError, match=r"--topology='v9z:2x2': libtpu refused it.*TPU v9z.*"
                                       r"e\.g\. v5e:2x2, v5e:4x4"):
    aot.tpu_devices('v9z:2x2')
  with pytest.raises(ValueError, match=r"v5e:3x3.*multiples of the chips per host"):
    aot.tpu_devices('v5e:3x3')
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ImportError, match=rf'pip install "jax\[tpu\]=={jax.__version__}"'):
    aot.tpu_devices('v5e:2x2')


def test_the_compilers_refusal_is_read_as_the_bytes_needed_and_available():
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (27.95G) exceeds available HBM (15.75G).')
  assert aot.out_of_memory(RuntimeError(f'{message}\nmore')) == {
      'needed_bytes': int(27.95 * 2**30), 'available_bytes': int(15.75 * 2**30),
      'message': message}
  assert aot.out_of_memory(RuntimeError('RESOURCE_EXHAUSTED: no sizes'))['needed_bytes'] is None
  assert aot.out_of_memory(RuntimeError('INVALID_ARGUMENT: a shape')) is None


def test_the_roofline_bounds_the_step_by_its_slower_side():
  v5e = chips.CHIPS['TPU v5 lite']  # 197 TFLOP/s, 819 GB/s
  result = {'flops': 197e9, 'bytes_accessed': 81.9e6, 'loops': 0, 'device_kind': 'TPU v5 lite'}
  bound = aot.roofline(result, v5e, per_chip=1)
  assert bound['compute_s'] == pytest.approx(1e-3) and bound['memory_s'] == pytest.approx(1e-4)
  assert bound['bound_s'] == bound['compute_s'] and bound['bound_by'].startswith('compute')
  # Two devices (cores) per chip: each has half the chip's rates.
  halved = aot.roofline({**result, 'bytes_accessed': 1638e6}, v5e, per_chip=2)
  assert halved['compute_s'] == pytest.approx(2e-3) and halved['memory_s'] == pytest.approx(4e-3)
  assert halved['bound_s'] == halved['memory_s'] and halved['bound_by'].startswith('memory')
  assert halved['intensity'] == pytest.approx(197e9 / 1638e6)
  assert not any('loop' in line for line in aot.roofline_lines(result, v5e, 1))
  assert 'undercounts' in aot.roofline_lines({**result, 'loops': 2}, v5e, 1)[-1]
  assert aot.roofline(result, chips.CHIPS['TPU7x'], 1) is None  # rates unknown: no bound


def test_a_step_that_fits_no_batch_gets_does_not_fit_with_its_bytes_not_a_traceback():
  # 4 branches of MLP 8192 x 65536 with their Adam moments: ~50 GiB, on a 16 GiB v5e chip.
  env = dict(os.environ, XLA_FLAGS='')
  out = subprocess.run(
      [sys.executable, '-m', 'paraformer_jax.aot', '--config=configs/tiny.py',
       '--topology=v5e:2x2', '--config.model.width=8192', '--config.model.num_heads=128',
       '--config.model.mlp_dim=65536', '--max_batch'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  needed = re.findall(r'refused by the compiler: needs ([\d.]+) GiB of temporaries, '
                      r'15\.750 GiB available', out.stdout)
  # Batches 96, 4, 16, and 4 again in the verdict.
  assert len(needed) == 4 and all(float(n) > 40 for n in needed), out.stdout
  assert ('HBM per device 16.000 GiB: DOES NOT FIT: try a smaller --config.training.batch_size '
          '(now 96; --max_batch finds the largest that fits)') in out.stdout
  # --max_batch took the refusals as "too big" and stopped at one example per device.
  assert 'no batch fits: DOES NOT FIT even at 4 (one example per device' in out.stdout
