"""Accelerator tables (SPEC §8): peak dense bf16 FLOP/s and HBM per chip, by `jax.Device.device_kind`.

`chip_peak(device)` is the trainer's MFU denominator; `chip_hbm_bytes` is what compile_check fits into.
"""

from __future__ import annotations

import re
import typing as tp

# Peak dense bf16 TFLOP/s per chip and HBM per chip (GiB), SPEC §8.
PEAK_TFLOPS: dict[str, float] = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918, "h100": 989}
HBM_GIB: dict[str, float] = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 74.5}  # H100: 80 GB

GIB = 1024 ** 3


def chip_family(device_kind: tp.Any) -> str | None:
  """A `jax.Device.device_kind` ("TPU v5 lite", "TPU v5p", "TPU v4", "TPU v6 lite", "NVIDIA H100 80GB
  HBM3", ...) → a key of `PEAK_TFLOPS` ("v5e", ...), or None (CPU, unknown chips). A device object is
  accepted too."""
  kind = getattr(device_kind, "device_kind", device_kind)
  k = str(kind).lower()
  if "h100" in k:
    return "h100"
  if "tpu" not in k:
    return None
  if re.search(r"v6", k):
    return "v6e"
  if re.search(r"v5", k):
    return "v5e" if ("lite" in k or "v5e" in k) else "v5p"   # v5p reports "TPU v5" or "TPU v5p"
  if re.search(r"v4", k):
    return None if "lite" in k else "v4"                     # v4i ("TPU v4 lite") is another chip
  return None


def chip_peak(device_kind: tp.Any) -> float | None:
  """Peak bf16 FLOP/s of one chip (not TFLOP/s), None when unknown (CPU): MFU's denominator."""
  fam = chip_family(device_kind)
  return None if fam is None else PEAK_TFLOPS[fam] * 1e12


def chip_hbm_bytes(device_kind: tp.Any) -> int | None:
  fam = chip_family(device_kind)
  return None if fam is None else int(HBM_GIB[fam] * GIB)
