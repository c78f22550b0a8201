"""Building blocks shared by pixelground's models: parameters with logical axes, RMS norm, projections
with optional LoRA, and a stack of identical layers that is either scanned or unrolled.

Conventions: parameters are created in `param_dtype` and cast to the compute `dtype` where used; every
parameter carries logical axis names in its `axes` metadata (see `pixelground.parallel.sharding`).
"""

from __future__ import annotations

import math
import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx

from pixelground.parallel.sharding import AXES_KEY, batch_axes

Axes = tuple[str | None, ...]
Initializer = tp.Callable[[jax.Array, tuple[int, ...], tp.Any], jax.Array]


def normal(std: float) -> Initializer:
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def next_key(rngs: nnx.Rngs) -> jax.Array:
  """`rngs.params()`, bit for bit: fold the stream's count into its key, then count + 1.

  NNX writes the count as `count[...] += 1`, and under a trace (jit, eval_shape) that indexed write
  compares the tracer's `.sharding`; JAX refuses with an error message whose origin search walks the
  whole trace so far, so building a model costs time quadratic in its number of parameters (~10 s of
  the demo's ~1,150). Replacing the count's value outright is the same update without that check."""
  stream = rngs.params
  stream.count._check_can_update()
  key = jax.random.fold_in(stream.key[...], stream.count[...])
  stream.count.set_value(stream.count[...] + 1)
  return key


def make_param(rngs: nnx.Rngs, init: Initializer, shape: tp.Sequence[int], axes: Axes, dtype,
               kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
  """A parameter of `shape` with logical `axes` (one name per dimension)."""
  shape = tuple(int(s) for s in shape)
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  return kind(init(next_key(rngs), shape, dtype), **{AXES_KEY: tuple(axes)})


def count_params(model: nnx.Module, wrt: tp.Any = nnx.Param) -> int:
  """Number of parameters of `model` matching the NNX filter `wrt` (works on `nnx.eval_shape` models)."""
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, wrt)))


class RMSNorm(nnx.Module):
  """T5 layer norm: x / sqrt(mean(x²) + eps) * scale; no mean subtraction, no bias. Computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = make_param(rngs, ones, (dim,), ("embed",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last dim with scale and bias (also LayerNorm2d on NHWC maps); float32 math."""

  def __init__(self, dim: int, axis: str | None, *, eps: float, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = make_param(rngs, ones, (dim,), (axis,), param_dtype)
    self.bias = make_param(rngs, zeros, (dim,), (axis,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Projection(nnx.Module):
  """A linear map from trailing dims `in_shape` to `out_shape`, optional bias and LoRA update.

  y = x·W (+ b) + (alpha / rank)·(x·A)·B, where W: in_shape + out_shape (normal, std `init_std`, default
  fan_in^-0.5), b: out_shape, A: in_shape + (rank,) (initialised like W), B: (rank,) + out_shape (zeros),
  so the LoRA branch starts as the identity change. LoRA weights are `nnx.LoRAParam`s, which lets an
  optimizer train them alone.
  """

  def __init__(self, in_shape: tp.Sequence[int], out_shape: tp.Sequence[int], in_axes: Axes,
               out_axes: Axes, *, init_std: float | None = None, use_bias: bool = False,
               lora_rank: int = 0, lora_alpha: float = 0.0, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    self.dtype = dtype
    if init_std is None:
      init_std = math.prod(self.in_shape) ** -0.5
    self.kernel = make_param(rngs, normal(init_std), self.in_shape + self.out_shape,
                             tuple(in_axes) + tuple(out_axes), param_dtype)
    self.bias = (make_param(rngs, zeros, self.out_shape, tuple(out_axes), param_dtype)
                 if use_bias else None)
    self.lora_rank = lora_rank
    self.lora_scale = (lora_alpha / lora_rank) if lora_rank else 0.0
    if lora_rank:
      # LoRA factors train in float32 even when the frozen base weights are stored in bfloat16.
      self.lora_a = make_param(rngs, normal(init_std), self.in_shape + (lora_rank,),
                               tuple(in_axes) + ("lora",), jnp.float32, nnx.LoRAParam)
      self.lora_b = make_param(rngs, zeros, (lora_rank,) + self.out_shape,
                               ("lora",) + tuple(out_axes), jnp.float32, nnx.LoRAParam)

  def _contract(self, x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    lead = x.shape[: x.ndim - n_in]
    k = math.prod(w.shape[:n_in])
    y = jnp.dot(x.reshape(lead + (k,)), w.reshape(k, -1).astype(self.dtype),
                preferred_element_type=jnp.float32)
    return y.astype(self.dtype).reshape(lead + w.shape[n_in:])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = self._contract(x, self.kernel[...], len(self.in_shape))
    if self.bias is not None:
      y = (y.astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)
    if self.lora_rank:
      h = self._contract(x, self.lora_a[...], len(self.in_shape))
      y = y + self.lora_scale * self._contract(h, self.lora_b[...], 1)
    return y

  def merge_lora(self) -> None:
    """Folds the LoRA update into the kernel and zeroes B (outputs unchanged up to rounding)."""
    if not self.lora_rank:
      return
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    kernel = self.kernel[...]
    # Scanned stacks carry a leading `layers` dim on all three arrays.
    lead = a.shape[: a.ndim - len(self.in_shape) - 1]
    k, n = math.prod(self.in_shape), math.prod(self.out_shape)
    delta = jnp.matmul(a.reshape(lead + (k, self.lora_rank)), b.reshape(lead + (self.lora_rank, n)))
    delta = delta.reshape(kernel.shape)
    self.kernel[...] = (kernel.astype(jnp.float32) + self.lora_scale * delta).astype(kernel.dtype)
    self.lora_b[...] = jnp.zeros_like(self.lora_b[...])


def _prepend_axis(state: tp.Any, name: str) -> tp.Any:
  def one(v):
    if isinstance(v, nnx.Variable):
      axes = v.get_metadata().get(AXES_KEY)
      if axes is not None:
        v.set_metadata(AXES_KEY, (name,) + tuple(axes))
    return v

  return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins an activation's leading (batch) dim to the batch mesh axes of the current mesh (no-op without
  one, or when the batch does not divide). Without it XLA may keep activations sharded over `data` only
  and split weights' embed dim over `fsdp`, so weight-free ops (attention) run on fsdp× the batch. The
  batch axes are the "batch" rule of the active `sharding.use(mesh, rules)` context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in batch_axes() if a in mesh.shape and mesh.shape[a] > 1)
  size = math.prod(mesh.shape[a] for a in axes)
  if not axes or x.shape[0] % size:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


class LayerStack(nnx.Module):
  """`num_layers` layers of identical structure, applied in sequence.

  With `scan=True` the parameters are stacked on a leading `layers` axis and applied with `jax.lax.scan`
  (one compiled layer body: fast compiles for deep models); otherwise they are separate modules
  (`layers.0`, `layers.1`, ...) applied by an unrolled loop. `remat` wraps each layer body in
  `jax.checkpoint` with the named policy ("none", "full", "dots").

  Layers are called as `layer.<method_name>(x, per_layer, **shared) -> (x, out)`. `per_layer` is a
  pytree with a leading layer axis (sliced per layer) or None; unrolled stacks also take a tuple with one
  entry per layer, which avoids copying slices of stacked buffers (decode caches). Outputs come back
  stacked on a leading layer axis (scan) or as a tuple with one entry per layer (unrolled).
  """

  def __init__(self, make_layer: tp.Callable[..., nnx.Module], num_layers: int, *,
               scan: bool, remat: str = "none", indexed: bool = False, rngs: nnx.Rngs):
    """`make_layer(rngs)` builds one layer; with `indexed=True` it is `make_layer(rngs, index)`, for
    unrolled stacks whose layers differ by position (e.g. SAM's windowed vs global blocks)."""
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    if indexed and scan:
      raise ValueError("LayerStack: indexed layers differ by position and cannot be scanned.")
    self.num_layers, self.scan, self.remat = num_layers, scan, remat
    if scan:
      graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_layer(nnx.Rngs(0))))
      keys = jax.random.split(next_key(rngs), num_layers)
      states = jax.vmap(lambda k: nnx.state(make_layer(nnx.Rngs(params=k))))(keys)
      self.layers = nnx.merge(graphdef, _prepend_axis(states, "layers"))
    else:
      self.layers = nnx.List([make_layer(rngs, i) if indexed else make_layer(rngs)
                              for i in range(num_layers)])

  def _body(self, graphdef, method_name: str, shared):
    def body(state, x, per_layer):  # shared kwargs closed over: Python values stay static under remat
      return getattr(nnx.merge(graphdef, state), method_name)(x, per_layer, **shared)

    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      body = jax.checkpoint(body, policy=policy)
    return body

  def __call__(self, x: jax.Array, per_layer: tp.Any = None, *, method_name: str = "__call__",
               **shared) -> tuple[jax.Array, tp.Any]:
    if self.scan:
      graphdef, state = nnx.split(self.layers)
      body = self._body(graphdef, method_name, shared)

      def step(carry, xs):
        layer_state, per_i = xs
        y, out = body(layer_state, constrain_batch(carry), per_i)
        return constrain_batch(y), out

      return jax.lax.scan(step, x, (state, per_layer))
    outs = []
    for i, layer in enumerate(self.layers):
      graphdef, state = nnx.split(layer)
      if isinstance(per_layer, (list, tuple)):  # per-layer buffers: no slicing copies
        per_i = per_layer[i]
      else:
        per_i = jax.tree.map(lambda a, i=i: a[i], per_layer)
      x, out = self._body(graphdef, method_name, shared)(state, constrain_batch(x), per_i)
      x = constrain_batch(x)
      outs.append(out)
    return x, (tuple(outs) if outs and outs[0] is not None else None)
