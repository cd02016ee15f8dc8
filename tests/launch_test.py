"""The launchers: valid bash, clean under shellcheck, and the command lines they build."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ['local.sh', 'multi_gpu.sh', 'tpu_pod.sh']
SHELLCHECK = os.path.join(os.path.dirname(sys.executable), 'shellcheck')


@pytest.mark.parametrize('name', LAUNCHERS)
def test_launcher_is_valid_bash_and_shellcheck_clean(name):
  path = os.path.join(REPO, 'launch', name)
  subprocess.run(['bash', '-n', path], check=True)
  lint = subprocess.run([SHELLCHECK, path], capture_output=True, text=True)
  assert lint.returncode == 0, lint.stdout


def _launch(name, args, **env):
  return subprocess.run(['bash', os.path.join(REPO, 'launch', name), *args],
                        env={**os.environ, 'PYTHON': 'echo', **env}, capture_output=True,
                        text=True)


def test_launchers_build_the_main_command():
  out = _launch('local.sh', ['configs/digits.py', '/tmp/w', '--config.seed=3'])
  assert out.stdout.split() == ['-m', 'paraformer_jax.main', '--config=configs/digits.py',
                                '--workdir=/tmp/w', '--config.seed=3']
  out = _launch('multi_gpu.sh', ['configs/cifar10.py', '/shared/w'], COORDINATOR='n0:1234',
                NUM_NODES='2', NODE_RANK='1')
  assert '--coordinator_address=n0:1234 --num_processes=2 --process_id=1' in out.stdout
  out = _launch('multi_gpu.sh', ['configs/cifar10.py', '/shared/w'], COORDINATOR='n0:1234')
  assert out.returncode != 0 and 'NUM_NODES' in out.stderr


@pytest.mark.parametrize('name', LAUNCHERS)
def test_launchers_explain_their_usage(name):
  out = _launch(name, [])
  assert out.returncode == 2 and 'usage:' in out.stderr
