"""T5 v1.1 / FLAN-T5 (and original T5) encoder-decoder in Flax NNX (SPEC.md section 1.6).

Architecture: pre-norm blocks with RMS norm (no bias), bias-free attention without 1/sqrt(d) scaling,
relative position bias (bidirectional buckets in the encoder, causal in the decoder; one table per stack,
held by the first layer in HF checkpoints), gated-GELU (GELU-tanh) or ReLU MLP, untied or tied logits.

Shapes: B batch, S encoder length (visual prefix + text), T decoder length, H heads, K head dim,
D d_model, V vocab. Token ids are int32; pad 0, EOS 1, decoder start = pad.

The encoder takes optional prefix embeddings (PixelLLM's visual tokens) ahead of the embedded text with
one padding mask over the whole input. The decoder returns logits and its final hidden states (after the
final norm), which PixelLLM's location head reads. `init_decode` / `decode_step` implement incremental
decoding with a KV cache (see `pixelground.inference.decoding` for greedy and beam search).
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelground.config.parse import ModelConfig, preset_config
from pixelground.models.layers import LayerStack, Projection, RMSNorm, make_param, normal

NEG_INF = -1e9  # additive mask value; finite so fully masked rows stay NaN-free.

LORA_TARGETS = (
    "encoder.attn.q", "encoder.attn.k", "encoder.attn.v", "encoder.attn.o",
    "decoder.self_attn.q", "decoder.self_attn.k", "decoder.self_attn.v", "decoder.self_attn.o",
    "decoder.cross_attn.q", "decoder.cross_attn.k", "decoder.cross_attn.v", "decoder.cross_attn.o",
    "encoder.mlp", "decoder.mlp",
)
# PixelLLM's choice (SPEC 1.6): q and v of encoder self-, decoder self- and cross-attention.
PIXELLLM_LORA_TARGETS = ("encoder.attn.q", "encoder.attn.v", "decoder.self_attn.q",
                         "decoder.self_attn.v", "decoder.cross_attn.q", "decoder.cross_attn.v")


@dataclasses.dataclass(frozen=True)
class T5Config(ModelConfig):
  """T5 hyper-parameters. Defaults are T5 v1.1 / FLAN-T5 small."""
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  head_dim: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  mlp_activation: str = "gated-gelu"  # "gated-gelu" (v1.1, FLAN) or "relu" (original T5)
  relpos_buckets: int = 32
  relpos_max_distance: int = 128
  tie_embeddings: bool = False
  # Multiply final hidden states by d_model**-0.5 before the logits (original T5 with tied embeddings).
  scale_decoder_outputs: bool = False
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"  # storage dtype of the (frozen) base weights
  scan_layers: bool = False     # lax.scan over stacked layers (fast compiles) vs unrolled
  remat: str = "none"           # "none" | "full" | "dots": jax.checkpoint policy per block
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: tuple[str, ...] = ()
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0

  def __post_init__(self):
    if self.mlp_activation not in ("gated-gelu", "relu"):
      raise ValueError(f"T5Config.mlp_activation={self.mlp_activation!r}: use 'gated-gelu' or 'relu'.")
    bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if bad:
      raise ValueError(f"T5Config.lora_targets has unknown targets {bad}; valid: {LORA_TARGETS}.")
    if self.lora_targets and self.lora_rank <= 0:
      raise ValueError("T5Config.lora_targets is set but lora_rank is 0.")


def _v11(d_model, num_heads, d_ff, layers):
  return dict(d_model=d_model, num_heads=num_heads, head_dim=64, d_ff=d_ff,
              num_encoder_layers=layers, num_decoder_layers=layers)


# FLAN-T5 shares T5 v1.1's architecture; original T5 uses ReLU, tied embeddings and no dropout here.
PRESETS: dict[str, dict[str, tp.Any]] = {
    "t5-v1_1-small": _v11(512, 6, 1024, 8),
    "t5-v1_1-base": _v11(768, 12, 2048, 12),
    "t5-v1_1-large": _v11(1024, 16, 2816, 24),
    "t5-v1_1-xl": _v11(2048, 32, 5120, 24),
    "t5-v1_1-xxl": _v11(4096, 64, 10240, 24),
    "t5-small": dict(d_model=512, num_heads=8, head_dim=64, d_ff=2048, num_encoder_layers=6,
                     num_decoder_layers=6, mlp_activation="relu", tie_embeddings=True,
                     scale_decoder_outputs=True),
    "t5-base": dict(d_model=768, num_heads=12, head_dim=64, d_ff=3072, num_encoder_layers=12,
                    num_decoder_layers=12, mlp_activation="relu", tie_embeddings=True,
                    scale_decoder_outputs=True),
}
for _size in ("small", "base", "large", "xl", "xxl"):
  PRESETS[f"flan-t5-{_size}"] = PRESETS[f"t5-v1_1-{_size}"]


def preset(name: str, **overrides) -> T5Config:
  """`T5Config` for a named preset (e.g. "flan-t5-xl"), with field overrides."""
  return preset_config(T5Config, PRESETS, name, "T5", **overrides)


def config_from_hf(hf: tp.Mapping[str, tp.Any], **overrides) -> T5Config:
  """`T5Config` from a Hugging Face T5 `config.json` dict.

  Older configs use `tie_word_embeddings` for both tying and the d_model**-0.5 output rescale; transformers
  5 always ties and writes `scale_decoder_outputs`. Whether the lm_head is really separate is decided by
  the importer from the checkpoint's keys.
  """
  tie = hf.get("tie_word_embeddings", True)
  act = hf.get("feed_forward_proj", "relu")
  if act not in ("relu", "gated-gelu"):
    raise ValueError(f"config.json feed_forward_proj={act!r} is not supported (relu, gated-gelu).")
  return T5Config(**{
      "vocab_size": hf["vocab_size"], "d_model": hf["d_model"], "num_heads": hf["num_heads"],
      "head_dim": hf["d_kv"], "d_ff": hf["d_ff"], "num_encoder_layers": hf["num_layers"],
      "num_decoder_layers": hf.get("num_decoder_layers") or hf["num_layers"],
      "mlp_activation": act,
      "relpos_buckets": hf.get("relative_attention_num_buckets", 32),
      "relpos_max_distance": hf.get("relative_attention_max_distance", 128),
      "tie_embeddings": tie,
      "scale_decoder_outputs": hf.get("scale_decoder_outputs", tie),
      "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-6),
      "pad_id": hf.get("pad_token_id", 0) or 0, "eos_id": hf.get("eos_token_id", 1) or 1,
      "decoder_start_id": hf.get("decoder_start_token_id", 0) or 0,
      **overrides})


# ----------------------------------------------------------------------------------------------------
# Relative position buckets (computed in numpy at trace time: positions are static shapes)
# ----------------------------------------------------------------------------------------------------

def relative_buckets(rel: np.ndarray, *, bidirectional: bool, num_buckets: int,
                     max_distance: int) -> np.ndarray:
  """T5 bucket of each relative position `rel = key_pos - query_pos` (int array, any shape).

  Half the buckets are exact small distances, the rest log-spaced up to `max_distance`; bidirectional
  tables use separate halves for keys after / before the query. Float32 arithmetic as in the reference.
  """
  rel = np.asarray(rel, np.int64)
  out = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    out += (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(rel.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
  large = max_exact + np.where(rel < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return out + np.where(rel < max_exact, rel, large)


class RelativePositionBias(nnx.Module):
  """Learned per-head bias by relative-position bucket: table (buckets, H)."""

  def __init__(self, cfg: T5Config, *, bidirectional: bool, rngs: nnx.Rngs):
    self.cfg, self.bidirectional = cfg, bidirectional
    self.embedding = make_param(rngs, normal(cfg.d_model ** -0.5),
                                (cfg.relpos_buckets, cfg.num_heads), ("relpos_buckets", "heads"),
                                cfg.weight_dtype)

  def buckets(self, rel: np.ndarray) -> np.ndarray:
    return relative_buckets(rel, bidirectional=self.bidirectional, num_buckets=self.cfg.relpos_buckets,
                            max_distance=self.cfg.relpos_max_distance)

  def __call__(self, q_len: int, k_len: int) -> jax.Array:
    """(H, q_len, k_len) float32 bias for queries 0..q_len-1 against keys 0..k_len-1."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    table = self.embedding[...].astype(jnp.float32)
    return jnp.transpose(table[self.buckets(rel)], (2, 0, 1))

  def at_step(self, index: jax.Array, k_len: int) -> jax.Array:
    """(H, 1, k_len) causal bias for one query at dynamic position `index` against keys 0..k_len-1."""
    by_distance = self.buckets(-np.arange(k_len))  # bucket of distance d = index - key_pos >= 0
    dist = jnp.clip(index - jnp.arange(k_len), 0, k_len - 1)
    table = self.embedding[...].astype(jnp.float32)
    return jnp.transpose(table[jnp.asarray(by_distance)[dist]], (1, 0))[:, None, :]


# ----------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------

def _lora(cfg: T5Config, target: str) -> dict[str, tp.Any]:
  rank = cfg.lora_rank if target in cfg.lora_targets else 0
  return dict(lora_rank=rank, lora_alpha=cfg.lora_alpha)


class Attention(nnx.Module):
  """Multi-head attention with kernels q/k/v: (D, H, K), o: (H, K, D); no scaling (folded into init)."""

  def __init__(self, cfg: T5Config, lora_prefix: str, *, rngs: nnx.Rngs):
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.dtype = cfg.compute_dtype
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
    self.q = Projection((d,), (h, k), ("embed",), ("heads", "kv"), init_std=(d * k) ** -0.5,
                        **_lora(cfg, f"{lora_prefix}.q"), **common)
    self.k = Projection((d,), (h, k), ("embed",), ("heads", "kv"), init_std=d ** -0.5,
                        **_lora(cfg, f"{lora_prefix}.k"), **common)
    self.v = Projection((d,), (h, k), ("embed",), ("heads", "kv"), init_std=d ** -0.5,
                        **_lora(cfg, f"{lora_prefix}.v"), **common)
    self.o = Projection((h, k), (d,), ("heads", "kv"), ("embed",), init_std=(h * k) ** -0.5,
                        **_lora(cfg, f"{lora_prefix}.o"), **common)

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *,
             return_probs: bool = False):
    """q: (B,Q,H,K), k/v: (B,S,H,K), bias: broadcastable to (B,H,Q,S) float32 → (B,Q,D) [and the
    float32 attention probabilities (B,H,Q,S) with `return_probs`]."""
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1)
    out = self.o(jnp.einsum("bhqs,bshk->bqhk", probs.astype(self.dtype), v))
    return (out, probs) if return_probs else out

  def attend_cached(self, q, k_new, v_new, cache_kt, cache_v, bias, index):
    """One decode step: writes this step's key/value into the cache at `index`, then attends over it.

    q, k_new, v_new: (B,1,H,K); cache_kt: (B,H,K,T) and cache_v: (B,H,T,K) (layouts read without
    transposes); bias: (B|1,H,1,T) float32 with NEG_INF after `index`. The write comes first so the cache
    buffer has a single use and XLA updates it in place. → ((B,1,D), new cache_kt, new cache_v).
    """
    cache_kt = jax.lax.dynamic_update_slice(
        cache_kt, jnp.transpose(k_new, (0, 2, 3, 1)).astype(cache_kt.dtype), (0, 0, 0, index))
    cache_v = jax.lax.dynamic_update_slice(
        cache_v, jnp.transpose(v_new, (0, 2, 1, 3)).astype(cache_v.dtype), (0, 0, index, 0))
    return self.attend_precomputed(q, cache_kt, cache_v, bias), cache_kt, cache_v

  def attend_precomputed(self, q, kt, v, bias) -> jax.Array:
    """Attention against precomputed keys kt: (B,H,K,S) and values v: (B,H,S,K) (decode layouts)."""
    scores = jnp.einsum("bqhk,bhks->bhqs", q, kt, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    return self.o(jnp.einsum("bhqs,bhsk->bqhk", probs, v))


class MLP(nnx.Module):
  """Gated-GELU: wo(gelu_tanh(x·wi_0) * x·wi_1); ReLU: wo(relu(x·wi))."""

  def __init__(self, cfg: T5Config, lora_prefix: str, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, **_lora(cfg, lora_prefix),
                  rngs=rngs)
    self.gated = cfg.mlp_activation == "gated-gelu"
    if self.gated:
      self.wi_0 = Projection((d,), (f,), ("embed",), ("mlp",), init_std=d ** -0.5, **common)
      self.wi_1 = Projection((d,), (f,), ("embed",), ("mlp",), init_std=d ** -0.5, **common)
    else:
      self.wi = Projection((d,), (f,), ("embed",), ("mlp",), init_std=d ** -0.5, **common)
    self.wo = Projection((f,), (d,), ("mlp",), ("embed",), init_std=f ** -0.5, **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.gated:
      h = jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x)
    else:
      h = jax.nn.relu(self.wi(x))
    return self.wo(h)


def _norm(cfg: T5Config, rngs: nnx.Rngs) -> RMSNorm:
  return RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
                 param_dtype=cfg.weight_dtype, rngs=rngs)


class EncoderLayer(nnx.Module):

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.attn_norm = _norm(cfg, rngs)
    self.attn = Attention(cfg, "encoder.attn", rngs=rngs)
    self.mlp_norm = _norm(cfg, rngs)
    self.mlp = MLP(cfg, "encoder.mlp", rngs=rngs)

  def __call__(self, x, per_layer, *, bias):
    del per_layer
    h = self.attn_norm(x)
    x = x + self.attn.attend(self.attn.q(h), self.attn.k(h), self.attn.v(h), bias)
    return x + self.mlp(self.mlp_norm(x)), None


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.self_attn_norm = _norm(cfg, rngs)
    self.self_attn = Attention(cfg, "decoder.self_attn", rngs=rngs)
    self.cross_attn_norm = _norm(cfg, rngs)
    self.cross_attn = Attention(cfg, "decoder.cross_attn", rngs=rngs)
    self.mlp_norm = _norm(cfg, rngs)
    self.mlp = MLP(cfg, "decoder.mlp", rngs=rngs)

  def cross_kv(self, encoder_out, per_layer):
    """Cross-attention keys/values of this layer in decode layouts: K (B,H,K,S), V (B,H,S,K)."""
    del per_layer
    k, v = self.cross_attn.k(encoder_out), self.cross_attn.v(encoder_out)
    return encoder_out, (jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3)))

  def __call__(self, x, per_layer, *, self_bias, cross_bias, encoder_out=None, index=None,
               cross_probs: bool = False):
    """Full sequence (per_layer None) or one cached step at `index` (per_layer has this layer's cache
    and cross K/V; returns the updated cache). With `cross_probs` (full sequence only) the second
    output is this layer's cross-attention probabilities (B,H,T,S) instead."""
    per_layer = per_layer or {}
    h = self.self_attn_norm(x)
    q, k, v = self.self_attn.q(h), self.self_attn.k(h), self.self_attn.v(h)
    if "cache_k" in per_layer:
      out, *new_kv = self.self_attn.attend_cached(q, k, v, per_layer["cache_k"], per_layer["cache_v"],
                                                  self_bias, index)
      x = x + out
    else:
      x = x + self.self_attn.attend(q, k, v, self_bias)
      new_kv = None
    h = self.cross_attn_norm(x)
    if "cross_k" in per_layer:
      x = x + self.cross_attn.attend_precomputed(self.cross_attn.q(h), per_layer["cross_k"],
                                                 per_layer["cross_v"], cross_bias)
    else:
      ck, cv = self.cross_attn.k(encoder_out), self.cross_attn.v(encoder_out)
      out = self.cross_attn.attend(self.cross_attn.q(h), ck, cv, cross_bias, return_probs=cross_probs)
      if cross_probs:
        out, new_kv = out
      x = x + out
    return x + self.mlp(self.mlp_norm(x)), new_kv


def _padding_bias(mask: jax.Array) -> jax.Array:
  """(B,S) bool key mask → (B,1,1,S) additive float32 bias."""
  return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[:, None, None, :]


class Encoder(nnx.Module):

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.relpos = RelativePositionBias(cfg, bidirectional=True, rngs=rngs)
    self.layers = LayerStack(lambda r: EncoderLayer(cfg, rngs=r), cfg.num_encoder_layers,
                             scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs)
    self.final_norm = _norm(cfg, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: (B,S,D) embeddings, mask: (B,S) bool (True = real token) → (B,S,D) normalised outputs."""
    s = x.shape[1]
    bias = self.relpos(s, s)[None] + _padding_bias(mask)
    x, _ = self.layers(x, None, bias=bias)
    return self.final_norm(x)


class Decoder(nnx.Module):

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.relpos = RelativePositionBias(cfg, bidirectional=False, rngs=rngs)
    self.layers = LayerStack(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_decoder_layers,
                             scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs)
    self.final_norm = _norm(cfg, rngs)

  def __call__(self, x: jax.Array, encoder_out: jax.Array, encoder_mask: jax.Array, *,
               cross_probs: bool = False):
    """x: (B,T,D) embedded decoder inputs → (B,T,D) final hidden states (after the final norm) [and
    the last layer's cross-attention probabilities (B,H,T,S) float32 with `cross_probs`]."""
    t = x.shape[1]
    causal = np.where(np.tril(np.ones((t, t), bool)), 0.0, NEG_INF).astype(np.float32)
    self_bias = self.relpos(t, t)[None] + causal[None, None]
    x, probs = self.layers(x, None, self_bias=self_bias, cross_bias=_padding_bias(encoder_mask),
                           encoder_out=encoder_out, cross_probs=cross_probs)
    if not cross_probs:
      return self.final_norm(x)
    return self.final_norm(x), probs[-1]

  def cross_kv(self, encoder_out: jax.Array):
    """Per-layer cross-attention K (B,H,K,S) and V (B,H,S,K): stacked as (K (L,…), V (L,…)) when
    scanned, else a tuple of per-layer (K, V) pairs."""
    _, kv = self.layers(encoder_out, None, method_name="cross_kv")
    return kv


class T5(nnx.Module):
  """T5 encoder-decoder. See module docstring for shapes."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embed = make_param(rngs, normal(1.0), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                  cfg.weight_dtype)
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = make_param(rngs, normal(cfg.d_model ** -0.5), (cfg.d_model, cfg.vocab_size),
                                ("embed", "vocab"), cfg.weight_dtype)

  # -- pieces ----------------------------------------------------------------------------------------
  def embed(self, ids: jax.Array) -> jax.Array:
    """(…) int ids → (…, D) embeddings in the compute dtype."""
    return jnp.take(self.token_embed[...], ids, axis=0).astype(self.cfg.compute_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(…, D) final hidden states → (…, V) float32 logits."""
    dtype = self.cfg.compute_dtype
    if self.cfg.scale_decoder_outputs:
      hidden = hidden * (self.cfg.d_model ** -0.5)
    if self.cfg.tie_embeddings:  # contract with the (V, D) table directly: no transposed copy
      return jnp.einsum("...d,vd->...v", hidden.astype(dtype), self.token_embed[...].astype(dtype),
                        preferred_element_type=jnp.float32)
    return jnp.dot(hidden.astype(dtype), self.lm_head[...].astype(dtype),
                   preferred_element_type=jnp.float32)

  def encode(self, input_ids: jax.Array | None = None, attention_mask: jax.Array | None = None, *,
             prefix_embeds: jax.Array | None = None,
             prefix_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes [prefix_embeds; embed(input_ids)].

    Args:
      input_ids: (B,S_text) int; attention_mask: (B,S_text) bool/int (default: ids != pad).
      prefix_embeds: (B,P,D) e.g. visual tokens, placed before the text; prefix_mask: (B,P) (default all).
    Returns:
      (B,S,D) encoder outputs and the (B,S) bool mask over the whole input (S = P + S_text).
    """
    parts, masks = [], []
    if prefix_embeds is not None:
      parts.append(prefix_embeds.astype(self.cfg.compute_dtype))
      masks.append(jnp.ones(prefix_embeds.shape[:2], bool) if prefix_mask is None
                   else prefix_mask.astype(bool))
    if input_ids is not None:
      parts.append(self.embed(input_ids))
      masks.append(input_ids != self.cfg.pad_id if attention_mask is None else attention_mask.astype(bool))
    if not parts:
      raise ValueError("T5.encode needs input_ids and/or prefix_embeds.")
    x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    mask = jnp.concatenate(masks, axis=1) if len(masks) > 1 else masks[0]
    return self.encoder(x, mask), mask

  def decode(self, decoder_input_ids: jax.Array, encoder_out: jax.Array,
             encoder_mask: jax.Array, *, cross_probs: bool = False):
    """Teacher-forced decoder: (B,T) inputs (targets shifted right, start = pad) → logits (B,T,V) f32 and
    final hidden states (B,T,D) [and the last layer's cross-attention probabilities (B,H,T,S) with
    `cross_probs`]."""
    hidden = self.decoder(self.embed(decoder_input_ids), encoder_out, encoder_mask,
                          cross_probs=cross_probs)
    if cross_probs:
      hidden, probs = hidden
      return self.logits(hidden), hidden, probs
    return self.logits(hidden), hidden

  def __call__(self, input_ids, attention_mask, decoder_input_ids, *, prefix_embeds=None,
               prefix_mask=None) -> tuple[jax.Array, jax.Array]:
    enc, mask = self.encode(input_ids, attention_mask, prefix_embeds=prefix_embeds,
                            prefix_mask=prefix_mask)
    return self.decode(decoder_input_ids, enc, mask)

  # -- incremental decoding ---------------------------------------------------------------------------
  def init_decode(self, encoder_out: jax.Array, encoder_mask: jax.Array, max_len: int) -> dict:
    """Decoding state for up to `max_len` steps.

    Returns {"self": {"k", "v"}, "static": {"cross", "cross_bias": (B,1,1,S)}}. Per layer, self-attention
    keys are (B,H,K,T) and values (B,H,T,K) zeros, cross-attention keys (B,H,K,S) and values (B,H,S,K):
    layouts each step reads without transposes. Scanned models stack them on a leading layer axis;
    unrolled models keep one buffer per layer (no slicing copies, in-place updates). Cross-attention K/V
    are computed here once; only "self" depends on the beam, so beam search reorders only that part.
    """
    cfg = self.cfg
    bh = (encoder_out.shape[0], cfg.num_heads)
    zeros_k = lambda *lead: jnp.zeros(lead + bh + (cfg.head_dim, max_len), cfg.compute_dtype)
    zeros_v = lambda *lead: jnp.zeros(lead + bh + (max_len, cfg.head_dim), cfg.compute_dtype)
    n = cfg.num_decoder_layers
    if cfg.scan_layers:
      self_cache = {"k": zeros_k(n), "v": zeros_v(n)}
    else:
      self_cache = {"k": tuple(zeros_k() for _ in range(n)), "v": tuple(zeros_v() for _ in range(n))}
    return {"self": self_cache,
            "static": {"cross": self.decoder.cross_kv(encoder_out), "cross_bias": _padding_bias(encoder_mask)}}

  def decode_step(self, cache: dict, tokens: jax.Array, index: jax.Array):
    """One decoder step. tokens: (B,) int inputs at position `index` (scalar int32).

    Returns (logits (B,V) f32, hidden (B,D), updated cache).
    """
    dec, scan = self.decoder, self.cfg.scan_layers
    k_cache, v_cache = cache["self"]["k"], cache["self"]["v"]
    max_len = (k_cache if scan else k_cache[0]).shape[-1]
    x = self.embed(tokens)[:, None, :]
    written = jnp.arange(max_len) <= index  # this step's key is written before attending
    self_bias = (dec.relpos.at_step(index, max_len)[None]
                 + jnp.where(written, 0.0, NEG_INF)[None, None, None, :])
    cross = cache["static"]["cross"]
    if scan:
      per_layer = {"cache_k": k_cache, "cache_v": v_cache, "cross_k": cross[0], "cross_v": cross[1]}
    else:
      per_layer = tuple({"cache_k": k, "cache_v": v, "cross_k": ck, "cross_v": cv}
                        for k, v, (ck, cv) in zip(k_cache, v_cache, cross))
    x, new_kv = dec.layers(x, per_layer, self_bias=self_bias, cross_bias=cache["static"]["cross_bias"],
                           index=index)
    hidden = dec.final_norm(x)[:, 0]
    if scan:
      new_k, new_v = new_kv
    else:
      new_k, new_v = tuple(kv[0] for kv in new_kv), tuple(kv[1] for kv in new_kv)
    return self.logits(hidden), hidden, {"self": {"k": new_k, "v": new_v}, "static": cache["static"]}

  def reorder_cache(self, cache: dict, index: jax.Array) -> dict:
    """Beam search: new batch row i takes old row index[i] (only the self-attention cache moves)."""
    axis = 1 if self.cfg.scan_layers else 0  # stacked buffers carry a leading layer axis
    moved = jax.tree.map(lambda a: jnp.take(a, index, axis=axis), cache["self"])
    return {"self": moved, "static": cache["static"]}
