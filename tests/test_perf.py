"""pixelground.perf: the chip tables and the HLO FLOP counter (loops × trip count)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelground.compile_check import _xla_cost_flops
from pixelground.perf import chips, hlo


@pytest.mark.parametrize("kind, family, peak", [
    ("TPU v5 lite", "v5e", 197e12), ("TPU v5e", "v5e", 197e12), ("TPU v5p", "v5p", 459e12),
    ("TPU v5", "v5p", 459e12), ("TPU v4", "v4", 275e12), ("TPU v6 lite", "v6e", 918e12),
    ("NVIDIA H100 80GB HBM3", "h100", 989e12), ("cpu", None, None), ("TPU v4 lite", None, None),
])
def test_chip_tables(kind, family, peak):
  assert chips.chip_family(kind) == family
  assert chips.chip_peak(kind) == peak
  if family:
    assert chips.chip_hbm_bytes(kind) == chips.HBM_GIB[family] * 2 ** 30
  assert chips.chip_peak(jax.devices()[0]) is None  # a device object works too (CPU here)


def _layers(scan: bool):
  def f(w, x):
    def body(h, wi):
      return jnp.tanh(h @ wi), None
    if scan:
      h, _ = jax.lax.scan(body, x, w)
    else:
      h = x
      for i in range(w.shape[0]):
        h, _ = body(h, w[i])
    return h.sum()
  return f


def test_hlo_flops_counts_loop_bodies_times_trip_count():
  """XLA's cost analysis counts a scanned body once; hlo_flops multiplies by the trip count and agrees
  with the unrolled program (CPU-compiled HLO: no libtpu needed)."""
  n, b, d = 6, 16, 32
  w = jax.ShapeDtypeStruct((n, d, d), jnp.float32)
  x = jax.ShapeDtypeStruct((b, d), jnp.float32)
  one_pass = 2.0 * b * d * d * n
  for scan in (True, False):
    fwd = jax.jit(_layers(scan)).lower(w, x).compile()
    r = hlo.hlo_flops(fwd.as_text())
    assert r["flops"] == one_pass and r["unknown_loops"] == 0
    assert r["loops"] == ([n] if scan else [])
  grad = jax.jit(jax.grad(_layers(True))).lower(w, x).compile()
  r = hlo.hlo_flops(grad.as_text())
  assert r["flops"] == 3 * one_pass and r["loops"] == [n, n]
  xla = _xla_cost_flops(grad)
  assert xla is not None and xla < r["flops"] / 2  # the loop bodies counted once

  def accumulate(w, x):  # nested loops: micro-batches × layers
    def micro(carry, xm):
      return carry + jax.grad(_layers(True))(w, xm), None
    return jax.lax.scan(micro, jnp.zeros_like(w), x.reshape(4, b // 4, d))[0]

  r = hlo.hlo_flops(jax.jit(accumulate).lower(w, x).compile().as_text())
  assert r["flops"] == 3 * one_pass and sorted(r["loops"]) == [4, n, n]


def test_hlo_flops_parses_convolutions():
  text = """HloModule m

ENTRY %main (p0: bf16[8,64], p1: bf16[64,128]) -> f32[8,128] {
  %p0 = bf16[8,64]{1,0} parameter(0)
  %p1 = bf16[64,128]{1,0} parameter(1)
  ROOT %convolution.1 = f32[8,128]{1,0:T(8,128)} convolution(%p0, %p1), dim_labels=bf_io->bf
}
"""
  assert hlo.hlo_flops(text)["flops"] == 2 * 8 * 64 * 128


def test_hlo_collectives_bytes_by_kind_with_loops():
  """8 CPU devices: per device x (8, 32) f32 = 1 KiB; an all-gather (result 8 KiB), a reduce-scatter
  (operand 8 KiB), one all-reduce + three in a fori_loop (1 KiB each)."""
  from jax.sharding import Mesh, PartitionSpec
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))

  def body(x):
    a = jax.lax.psum(x, "d")
    g = jax.lax.all_gather(x, "d", tiled=True)
    r = jax.lax.psum_scatter(g, "d", tiled=True)
    loop = jax.lax.fori_loop(0, 3, lambda i, c: c * 0.5 + jax.lax.psum(c, "d"), x)
    return a + r + loop

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec("d"), out_specs=PartitionSpec("d")))
  got = hlo.hlo_collectives(f.lower(jnp.ones((64, 32), jnp.float32)).compile().as_text())
  assert got["all-gather"] == {"count": 1, "bytes": 8192.0}
  assert got["reduce-scatter"] == {"count": 1, "bytes": 8192.0}
  assert got["all-reduce"] == {"count": 4, "bytes": 4096.0}
  assert got["all-to-all"]["count"] == got["collective-permute"]["count"] == 0
