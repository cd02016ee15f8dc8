"""Accelerator chips by the `device_kind` JAX reports: HBM, peak matmul rates, HBM bandwidth.

`aot` sets compiled programs against them (memory verdict, roofline); the training loop
divides the FLOP/s it executes by them (MFU). Figures are per chip, dense (no sparsity):

- TPUs: the Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v2, v3, v4, v5e,
  v5p, v6e; read 2026-12-02), which give bf16 rates only. On a TPU, JAX's default precision
  runs float32 matmuls as one bf16 pass of the MXU, so a float32 model's peak is the bf16
  figure unless `jax_default_matmul_precision` asks for more passes.
- GPUs: NVIDIA's datasheets (A100 80GB SXM, H100 SXM and PCIe, H200 SXM; read 2026-12-02):
  bf16 tensor-core rates, and float32 as the CUDA cores run it (XLA on GPU uses TF32 tensor
  cores for float32 matmuls only if `jax_default_matmul_precision` allows it).
A chip not listed gets a memory verdict or MFU of "unknown", never a guess.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float  # HBM capacity per chip
  bf16_tflops: float | None  # peak dense bf16 matmul rate per chip
  f32_tflops: float | None  # peak float32 matmul rate per chip, at JAX's default precision
  hbm_gbps: float | None  # HBM bandwidth per chip, GB/s

  def peak_tflops(self, dtype: str) -> float | None:
    return self.bf16_tflops if dtype == 'bfloat16' else self.f32_tflops


# Matched by the start of device_kind, longest name first ('TPU v5 lite' before 'TPU v5').
CHIPS = {
    'TPU v2': Chip(16, 45, 45, 600),
    'TPU v3': Chip(32, 123, 123, 900),
    'TPU v4': Chip(32, 275, 275, 1200),
    'TPU v5 lite': Chip(16, 197, 197, 819),  # v5e
    'TPU v5': Chip(95, 459, 459, 2765),  # v5p
    'TPU v6 lite': Chip(32, 918, 918, 1640),  # v6e (Trillium)
    'TPU7x': Chip(192, None, None, None),
    'NVIDIA A100-SXM4-80GB': Chip(80, 312, 19.5, 2039),
    'NVIDIA A100-SXM4-40GB': Chip(40, 312, 19.5, 1555),
    'NVIDIA H100 PCIe': Chip(80, 756, 51, 2000),
    'NVIDIA H100': Chip(80, 989, 67, 3350),  # SXM ('NVIDIA H100 80GB HBM3')
    'NVIDIA H200': Chip(141, 989, 67, 4800),
}


def lookup(device_kind: str) -> Chip | None:
  for name in sorted(CHIPS, key=len, reverse=True):
    if device_kind.startswith(name):
      return CHIPS[name]
  return None
