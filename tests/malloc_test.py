"""Which malloc a process runs under, read from its own memory map, and the CPU hint."""
import ctypes.util
import os
import subprocess
import sys

import pytest

from paraformer_jax import malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCMALLOC = 'libtcmalloc_minimal.so.4'


def _allocator_of_child(preload):
  env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
  if preload:
    env['LD_PRELOAD'] = preload
  code = 'from paraformer_jax import malloc; print(malloc.loaded_allocator())'
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                       text=True, check=True, timeout=60)
  return out.stdout.strip()


@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='Linux only')
def test_reads_the_allocator_the_process_was_started_with():
  assert _allocator_of_child(None) == 'glibc'
  if not ctypes.util.find_library('tcmalloc_minimal'):
    pytest.skip('tcmalloc is not installed (apt install libtcmalloc-minimal4)')
  assert _allocator_of_child(TCMALLOC) == 'tcmalloc'


def test_without_proc_the_allocator_is_unknown(tmp_path):
  assert malloc.loaded_allocator(str(tmp_path / 'no_maps')) == 'unknown'


def test_the_hint_is_for_glibc_on_a_cpu_only():
  assert TCMALLOC in malloc.hint('cpu', 'glibc') and 'RELEASE_RATE=0' in malloc.HINT
  assert [malloc.hint(b, a) for b, a in [('cpu', 'tcmalloc'), ('cpu', 'jemalloc'),
                                         ('cpu', 'unknown'), ('gpu', 'glibc'),
                                         ('tpu', 'glibc')]] == [None] * 5
