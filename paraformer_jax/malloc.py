"""Which malloc the process runs under, and the hint to change it on a CPU.

XLA:CPU allocates a compiled program's temporaries afresh on every call. glibc serves each
allocation over 32 MiB with a new mmap and returns it to the kernel on free(), so every
training step page-faults its working set in again (226,000 faults per step of the paper's
8x2 model). tcmalloc keeps the memory: the trainer's step ran 1.28x faster under it
(`benchmarks/allocators.py`, docs/benchmarks.md); the digits config, whose buffers are
small, 1.05x.
"""
from __future__ import annotations

ALLOCATORS = ('tcmalloc', 'jemalloc')
HINT = ('On a CPU, tcmalloc can make training faster: XLA:CPU allocates every step\'s '
        'temporaries afresh and glibc hands large ones back to the kernel. The training step of '
        'the paper\'s 32 px model ran 1.28x faster under it, the small digits config 1.05x. '
        'To use it: apt '
        'install libtcmalloc-minimal4, then start the same command with '
        'LD_PRELOAD=libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0 (README, "What a run '
        'does").')


def loaded_allocator(maps: str = '/proc/self/maps') -> str:
  """'tcmalloc' or 'jemalloc' if this process has it loaded, else 'glibc'; 'unknown'
  without /proc (not Linux)."""
  try:
    with open(maps) as f:
      text = f.read()
  except OSError:
    return 'unknown'
  return next((name for name in ALLOCATORS if f'lib{name}' in text), 'glibc')


def hint(backend: str, allocator: str) -> str | None:
  """The line to log at the start of training, if any: on a CPU under glibc only."""
  return HINT if backend == 'cpu' and allocator == 'glibc' else None
