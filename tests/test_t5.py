"""T5 parity against transformers (PyTorch CPU), checkpoint import, decoding and LoRA."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pixelground.inference import decoding
from pixelground.checkpoints import loader, open_source
from pixelground.checkpoints.t5 import export_t5x_target, load_t5
from pixelground.checkpoints.t5x import save_t5x_checkpoint
from pixelground.models import t5 as t5_lib
from pixelground.models.lora import merge_lora

SMALL = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

# Variants HF can build: T5 v1.1 / FLAN-T5 (gated-GELU; transformers 5 ties lm_head to `shared` without
# output scaling), the same with a separate lm_head (as FLAN-T5 checkpoints on disk have), original T5.
VARIANTS = {
    "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "flan_t5_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, untie=True),
    "t5_original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}


def build_hf(variant: str, seed: int = 0, **extra) -> transformers.T5ForConditionalGeneration:
  torch.manual_seed(seed)
  kw = dict(VARIANTS[variant])
  untie = kw.pop("untie", False)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**SMALL, **kw, **extra)).eval()
  if untie:
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn(SMALL["vocab_size"], SMALL["d_model"]) * 0.5)
  return model


@functools.lru_cache(maxsize=None)
def saved_hf(variant: str, tmp_root: str, sharded: bool = False):
  model = build_hf(variant)
  path = os.path.join(tmp_root, f"{variant}{'_sharded' if sharded else ''}")
  model.save_pretrained(path, **({"max_shard_size": "20KB"} if sharded else {}))
  return model, path


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf"))


def padded_batch():
  """Encoder ids with right padding (rows of different lengths), decoder inputs (start = pad)."""
  rng = np.random.default_rng(0)
  lengths = [12, 3, 8, 1]
  ids = np.zeros((4, 12), np.int64)
  for i, n in enumerate(lengths):
    ids[i, : n - 1] = rng.integers(2, 99, n - 1)
    ids[i, n - 1] = 1
  dec = np.concatenate([np.zeros((4, 1), np.int64), rng.integers(2, 99, (4, 9))], axis=1)
  return ids, (ids != 0).astype(np.int64), dec


def hf_outputs(model, ids, mask, dec):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                decoder_input_ids=torch.tensor(dec), output_hidden_states=True)
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy(), out.decoder_hidden_states[-1].numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("scan", [False, True])
def test_float32_parity_with_transformers(variant, scan, tmp_root):
  hf, path = saved_hf(variant, tmp_root)
  model = load_t5(path, scan_layers=scan)
  ids, mask, dec = padded_batch()
  enc_ref, logits_ref, _ = hf_outputs(hf, ids, mask, dec)
  enc, enc_mask = model.encode(jnp.asarray(ids), jnp.asarray(mask))
  logits, hidden = model.decode(jnp.asarray(dec), enc, enc_mask)
  valid = mask.astype(bool)  # padded encoder positions are never read
  np.testing.assert_allclose(np.asarray(enc)[valid], enc_ref[valid], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logits), logits_ref, atol=1e-4, rtol=0)
  assert hidden.shape == (4, dec.shape[1], SMALL["d_model"])


@pytest.mark.parametrize("scan", [False, True])
def test_cross_attention_probs_match_transformers(scan, tmp_root):
  """`decode(cross_probs=True)` (the demo's attention-grounding loss reads it): the last decoder
  layer's cross-attention probabilities equal transformers' `cross_attentions[-1]`; logits unchanged."""
  hf, path = saved_hf("t5_v1_1", tmp_root)
  model = load_t5(path, scan_layers=scan)
  ids, mask, dec = padded_batch()
  hf.set_attn_implementation("eager")  # sdpa returns no attention probabilities
  try:
    with torch.no_grad():
      ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
               decoder_input_ids=torch.tensor(dec), output_attentions=True)
  finally:
    hf.set_attn_implementation("sdpa")  # the cached model is shared with other tests
  enc, enc_mask = model.encode(jnp.asarray(ids), jnp.asarray(mask))
  logits, _, probs = model.decode(jnp.asarray(dec), enc, enc_mask, cross_probs=True)
  plain, _ = model.decode(jnp.asarray(dec), enc, enc_mask)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
  assert probs.shape == (4, SMALL["num_heads"], dec.shape[1], ids.shape[1]) and probs.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(probs), ref.cross_attentions[-1].numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
  assert np.all(np.asarray(probs)[~np.broadcast_to(mask.astype(bool)[:, None, None], probs.shape)] < 1e-6)


def test_sharded_safetensors_and_pytorch_bin(tmp_root):
  hf, path = saved_hf("flan_t5_untied", tmp_root, sharded=True)
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
  ids, mask, dec = padded_batch()
  _, logits_ref, _ = hf_outputs(hf, ids, mask, dec)
  logits, _ = load_t5(path)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
  np.testing.assert_allclose(np.asarray(logits), logits_ref, atol=1e-4, rtol=0)

  bin_dir = os.path.join(tmp_root, "bin")
  os.makedirs(bin_dir, exist_ok=True)
  torch.save(hf.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
  hf.config.to_json_file(os.path.join(bin_dir, "config.json"))
  logits_bin, _ = load_t5(bin_dir)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
  np.testing.assert_allclose(np.asarray(logits_bin), logits_ref, atol=1e-4, rtol=0)


def test_bfloat16_compute_tolerance(tmp_root):
  """bf16 compute (float32 params): logits within 2% of max|logit| of float32 PyTorch; argmax mostly agrees."""
  hf, path = saved_hf("t5_v1_1", tmp_root)
  ids, mask, dec = padded_batch()
  _, logits_ref, _ = hf_outputs(hf, ids, mask, dec)
  logits, _ = load_t5(path, dtype="bfloat16")(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
  err = np.abs(np.asarray(logits) - logits_ref).max()
  assert err <= 0.02 * np.abs(logits_ref).max(), err  # measured ≈ 0.8%
  agree = (np.asarray(logits).argmax(-1) == logits_ref.argmax(-1)).mean()
  assert agree >= 0.9, agree


@pytest.mark.parametrize("layout", ["legacy", "orbax"])
def test_t5x_checkpoint_roundtrip(layout, tmp_root, tmp_path):
  """Our weights written in the T5X layout load back to the same outputs."""
  _, path = saved_hf("flan_t5_untied", tmp_root)
  model = load_t5(path)
  ckpt = tmp_path / "checkpoint_100"
  target = export_t5x_target(model)
  if layout == "orbax":  # T5X models built with 3-D DenseGeneral kernels: (D, H, K) and (H, K, D)
    for key in [k for k in target if k.endswith(("query/kernel", "key/kernel", "value/kernel"))]:
      target[key] = target[key].reshape(32, 4, 8)
    for key in [k for k in target if k.endswith("out/kernel")]:
      target[key] = target[key].reshape(4, 8, 32)
  save_t5x_checkpoint(str(ckpt), target, step=100, layout=layout)
  source = open_source(ckpt)
  assert "target/encoder/layers_0/attention/query/kernel" in source.keys()
  assert source.shape("target/encoder/relpos_bias/rel_embedding") == (4, 8)  # (heads, buckets)
  again = load_t5(ckpt, model.cfg)
  ids, mask, dec = padded_batch()
  a, _ = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
  b, _ = again(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loader_errors_name_the_key(tmp_root, tmp_path):
  _, path = saved_hf("t5_v1_1", tmp_root)
  with open_source(path) as source:
    state = {k: source.read(k) for k in source.keys()}
  from safetensors.numpy import save_file
  import shutil

  def write(name, tensors):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(os.path.join(path, "config.json"), d / "config.json")
    save_file(tensors, str(d / "model.safetensors"))
    return str(d)

  missing = dict(state)
  del missing["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
  with pytest.raises(loader.CheckpointError, match=r"missing key 'decoder\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight'"):
    load_t5(write("missing", missing))
  extra = dict(state, **{"encoder.block.9.surprise.weight": np.zeros(3, np.float32)})
  with pytest.raises(loader.CheckpointError, match=r"unexpected key 'encoder\.block\.9\.surprise\.weight'"):
    load_t5(write("extra", extra))
  bad = dict(state, **{"encoder.final_layer_norm.weight": np.zeros(31, np.float32)})
  with pytest.raises(loader.CheckpointError, match=r"shape mismatch for 'encoder\.final_layer_norm\.weight'"):
    load_t5(write("bad", bad))
  bad_q = dict(state, **{"encoder.block.1.layer.0.SelfAttention.q.weight": np.zeros((30, 32), np.float32)})
  with pytest.raises(loader.CheckpointError,
                     match=r"shape mismatch for 'encoder\.block\.1\.layer\.0\.SelfAttention\.q\.weight'"):
    load_t5(write("bad_q", bad_q))


def test_relative_buckets_match_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-300, 300)[None, :]
  for bidirectional in (True, False):
    for nb, md in ((32, 128), (8, 20)):
      ref = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                  num_buckets=nb, max_distance=md).numpy()
      ours = t5_lib.relative_buckets(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
      np.testing.assert_array_equal(ours, ref)


# ------------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------------

def _jit_generate(model, **kw):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask):
    return decoding.generate(nnx.merge(graphdef, state), ids, mask, **kw)

  return lambda ids, mask: run(state, jnp.asarray(ids), jnp.asarray(mask))


@pytest.mark.parametrize("scan", [False, True])
def test_cached_greedy_equals_full_recompute(scan):
  cfg = t5_lib.T5Config(vocab_size=50, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
                        num_decoder_layers=2, relpos_buckets=8, relpos_max_distance=16, scan_layers=scan)
  model = t5_lib.T5(cfg, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(1)
  ids = rng.integers(2, 50, (4, 7))
  ids[:, -1] = 1
  ids[1, 4:] = 0
  ids[3, 2:] = 0
  mask = ids != 0
  cached = _jit_generate(model, max_len=24)(ids, mask)
  full = _jit_generate(model, max_len=24, use_cache=False)(ids, mask)
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(full.tokens))
  np.testing.assert_allclose(np.asarray(cached.scores), np.asarray(full.scores), atol=1e-4)
  np.testing.assert_allclose(np.asarray(cached.hidden), np.asarray(full.hidden), atol=1e-4)
  beam_cached = _jit_generate(model, max_len=24, num_beams=3)(ids, mask)
  beam_full = _jit_generate(model, max_len=24, num_beams=3, use_cache=False)(ids, mask)
  np.testing.assert_array_equal(np.asarray(beam_cached.tokens), np.asarray(beam_full.tokens))
  np.testing.assert_allclose(np.asarray(beam_cached.scores), np.asarray(beam_full.scores), atol=1e-4)
  # Teacher-forcing the generated tokens reproduces the hidden states the decoder returned.
  dec_in = np.concatenate([np.zeros((4, 1), np.int64), np.asarray(cached.tokens)[:, :-1]], axis=1)
  _, hidden = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec_in))
  for row, n in enumerate(np.asarray(cached.lengths)):
    np.testing.assert_allclose(np.asarray(hidden)[row, :n], np.asarray(cached.hidden)[row, :n], atol=1e-4)


@pytest.mark.parametrize("variant", ["t5_v1_1", "flan_t5_untied", "t5_original"])
def test_greedy_and_beam_match_transformers(variant, tmp_root):
  hf, path = saved_hf(variant, tmp_root)
  model = load_t5(path)
  ids, mask, _ = padded_batch()
  ours = _jit_generate(model, max_len=15)(ids, mask)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      num_beams=1, max_new_tokens=15)
  _assert_same_tokens(np.asarray(ours.tokens), ref.numpy()[:, 1:])
  for beams, alpha in ((3, 0.6), (4, 1.0)):
    ours = _jit_generate(model, max_len=15, num_beams=beams, length_penalty=alpha)(ids, mask)
    with torch.no_grad():
      ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                        num_beams=beams, length_penalty=alpha, max_new_tokens=15, output_scores=True,
                        return_dict_in_generate=True)
    _assert_same_tokens(np.asarray(ours.tokens), ref.sequences.numpy()[:, 1:])
    np.testing.assert_allclose(np.asarray(ours.scores), ref.sequences_scores.numpy(), atol=1e-4)


def _assert_same_tokens(ours, ref, eos=1):
  """Same tokens up to and including each row's first EOS. HF fills finished rows with its pad (which
  may be EOS) and trims to the longest row; ours is max_len wide with pad (0) after EOS."""
  assert ours.shape[0] == ref.shape[0]
  for row_ours, row_ref in zip(ours, ref):
    n = int(np.argmax(row_ref == eos)) + 1 if (row_ref == eos).any() else len(row_ref)
    np.testing.assert_array_equal(row_ours[:n], row_ref[:n])
    assert (row_ours[n:] == 0).all() or n == len(row_ref)


def test_greedy_eos_and_no_repeat():
  cfg = t5_lib.T5Config(vocab_size=20, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                        num_decoder_layers=1, relpos_buckets=8, relpos_max_distance=16)
  model = t5_lib.T5(cfg, rngs=nnx.Rngs(0))
  ids = np.array([[3, 4, 5, 1], [6, 7, 1, 0]])
  out = _jit_generate(model, max_len=30, no_repeat_previous=True)(ids, ids != 0)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  generated = np.arange(30)[None, :] < lengths[:, None]
  assert not (tokens[:, 1:] == tokens[:, :-1])[generated[:, 1:]].any(), tokens
  for row, n in zip(tokens, lengths):
    if n < 30:
      assert row[n - 1] == cfg.eos_id and (row[n:] == 0).all()
    assert (row[: n - 1] != cfg.eos_id).all()
  assert (np.asarray(out.hidden)[~generated] == 0).all()
  assert (np.abs(np.asarray(out.hidden)[generated]).sum(-1) > 0).all()
  # Without the option the same model does repeat tokens (so the check above is not vacuous).
  plain = np.asarray(_jit_generate(model, max_len=30)(ids, ids != 0).tokens)
  assert (plain[:, 1:] == plain[:, :-1]).any()


# ------------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------------

def test_lora_zero_init_merge_and_filter():
  base_cfg = t5_lib.T5Config(vocab_size=40, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=2,
                             num_decoder_layers=2, relpos_buckets=8, relpos_max_distance=16)
  cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=t5_lib.PIXELLLM_LORA_TARGETS + ("decoder.mlp",))
  base = t5_lib.T5(base_cfg, rngs=nnx.Rngs(0))
  lora = t5_lib.T5(cfg, rngs=nnx.Rngs(0))
  # Copy base weights into the LoRA model (same init order for base params is not assumed).
  base_flat = dict(loader.flatten_state(nnx.state(base))[0])
  for path, var in loader.flatten_state(nnx.state(lora))[0]:
    if not isinstance(var, nnx.LoRAParam):
      var.set_value(base_flat[path].get_value())
  ids = jnp.array([[3, 4, 5, 1], [6, 7, 1, 0]])
  dec = jnp.array([[0, 5, 6], [0, 9, 2]])
  ref, _ = base(ids, ids != 0, dec)
  out, _ = lora(ids, ids != 0, dec)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))  # B = 0 → exactly the base model

  trainable = nnx.state(lora, nnx.LoRAParam)
  n_lora = sum(x.size for x in jax.tree.leaves(trainable))
  # q, v of 3 attention kinds (2 layers each) + 3 decoder MLP projections (2 layers), A and B.
  expected = 2 * 2 * (16 * 4 + 4 * 16) * 3 + 2 * (2 * (16 * 4 + 4 * 32) + (32 * 4 + 4 * 16))
  assert n_lora == expected
  # Give B random values, then merging into the base kernels keeps the outputs.
  for path, var in loader.flatten_state(trainable)[0]:
    var.set_value(jax.random.normal(jax.random.key(len(path)), var.shape) * 0.1)
  nnx.update(lora, trainable)
  trained, _ = lora(ids, ids != 0, dec)
  assert np.abs(np.asarray(trained) - np.asarray(ref)).max() > 1e-3
  merge_lora(lora)
  merged, _ = lora(ids, ids != 0, dec)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(trained), atol=1e-4)
  assert all((np.asarray(v) == 0).all() for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(lora, nnx.LoRAParam))
             if "lora_b" in jax.tree_util.keystr(k))


def test_config_errors_name_the_key():
  from pixelground.config.parse import ConfigError, section
  with pytest.raises(ConfigError, match=r"'config.t5.d_modle'.*Did you mean 'd_model'"):
    section(t5_lib.T5Config, {"d_modle": 3}, "config.t5")
  with pytest.raises(ValueError, match="lora_targets"):
    t5_lib.T5Config(lora_rank=2, lora_targets=("encoder.attn.x",))
  with pytest.raises(ValueError, match="Unknown T5 preset 'flan-t5-tiny'"):
    t5_lib.preset("flan-t5-tiny")


def test_prefix_embeddings_match_transformers_inputs_embeds(tmp_root):
  """Visual-token prefix + text with one padding mask == HF fed the concatenated embeddings."""
  hf, path = saved_hf("flan_t5_untied", tmp_root)
  model = load_t5(path)
  ids, mask, dec = padded_batch()
  prefix = np.random.default_rng(5).normal(size=(4, 6, SMALL["d_model"])).astype(np.float32)
  prefix_mask = np.ones((4, 6), np.int64)
  prefix_mask[1, 4:] = 0  # padded prefix slots are masked too
  with torch.no_grad():
    embeds = torch.cat([torch.tensor(prefix), hf.shared(torch.tensor(ids))], dim=1)
    full_mask = torch.tensor(np.concatenate([prefix_mask, mask], axis=1))
    out = hf(inputs_embeds=embeds, attention_mask=full_mask, decoder_input_ids=torch.tensor(dec))
  enc, enc_mask = model.encode(jnp.asarray(ids), jnp.asarray(mask), prefix_embeds=jnp.asarray(prefix),
                               prefix_mask=jnp.asarray(prefix_mask))
  assert enc.shape == (4, 6 + ids.shape[1], SMALL["d_model"])
  valid = full_mask.numpy().astype(bool)
  np.testing.assert_array_equal(np.asarray(enc_mask), valid)
  np.testing.assert_allclose(np.asarray(enc)[valid], out.encoder_last_hidden_state.numpy()[valid], atol=1e-4)
  logits, _ = model.decode(jnp.asarray(dec), enc, enc_mask)
  np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_load_straight_into_mesh(scan, tmp_root):
  from jax.sharding import PartitionSpec as P
  from pixelground.parallel import sharding
  hf, path = saved_hf("flan_t5_untied", tmp_root, sharded=True)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = load_t5(path, mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=scan, lora_rank=2,
                  lora_alpha=4.0, lora_targets=t5_lib.PIXELLLM_LORA_TARGETS)
  layer = model.decoder.layers.layers if scan else model.decoder.layers.layers[1]
  lead = (None,) if scan else ()
  assert layer.cross_attn.q.kernel[...].sharding.spec == P(*lead, "fsdp", "tensor", None)
  assert layer.cross_attn.q.lora_a[...].sharding.spec == P(*lead, "fsdp", None)
  assert model.lm_head[...].sharding.spec == P("fsdp", None)  # vocab 99 is not divisible by tensor=2
  ids, mask, dec = padded_batch()
  _, logits_ref, _ = hf_outputs(hf, ids, mask, dec)
  with jax.set_mesh(mesh):
    logits, _ = jax.jit(lambda m, a, b, c: m(a, b, c))(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))
  np.testing.assert_allclose(np.asarray(logits), logits_ref, atol=1e-4)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_gradients(remat):
  cfg = t5_lib.T5Config(vocab_size=40, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=2,
                        num_decoder_layers=2, relpos_buckets=8, relpos_max_distance=16, scan_layers=True)
  ids = jnp.array([[3, 4, 5, 1], [6, 7, 1, 0]])
  dec = jnp.array([[0, 5, 6], [0, 9, 2]])

  def grads(cfg):
    model = t5_lib.T5(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss = lambda p: nnx.merge(graphdef, p)(ids, ids != 0, dec)[0].sum()
    return jax.jit(jax.grad(loss))(params)

  for a, b in zip(jax.tree.leaves(grads(cfg)), jax.tree.leaves(grads(cfg.replace(remat=remat)))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("name,count", [
    # Parameter counts of the published FLAN-T5 checkpoints (untied lm_head).
    ("flan-t5-small", 76_961_152), ("flan-t5-base", 247_577_856), ("flan-t5-large", 783_150_080),
    ("flan-t5-xl", 2_849_757_184), ("flan-t5-xxl", 11_135_332_352)])
def test_preset_parameter_counts(name, count):
  abstract = nnx.eval_shape(lambda: t5_lib.T5(t5_lib.preset(name, scan_layers=True), rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract))) == count


@pytest.mark.slow
def test_flan_t5_small_size_sharded_scan_parity(tmp_path):
  """Real FLAN-T5-small dimensions (vocab 32128, d 512, 8+8 layers, untied lm_head) from sharded
  safetensors into the 8-device mesh with scanned layers: logits and 32 greedy tokens match PyTorch."""
  from pixelground.parallel import sharding
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                              feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  hf = transformers.T5ForConditionalGeneration(cfg).eval()
  hf.config.tie_word_embeddings = False
  hf.lm_head.weight = torch.nn.Parameter(torch.randn(32128, 512) * 0.05)
  hf.save_pretrained(tmp_path, max_shard_size="50MB")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = load_t5(tmp_path, mesh=mesh, rules=sharding.DEFAULT_RULES, scan_layers=True)
  assert model.lm_head[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  rng = np.random.default_rng(0)
  ids = rng.integers(2, 32128, (8, 24))
  ids[:, -1] = 1
  ids[3, 10:] = 0
  mask = (ids != 0).astype(np.int64)
  dec = np.concatenate([np.zeros((8, 1), np.int64), rng.integers(2, 32128, (8, 15))], axis=1)
  _, logits_ref, _ = hf_outputs(hf, ids, mask, dec)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh):
    logits, _ = jax.jit(lambda s, a, b, c: nnx.merge(graphdef, s)(a, b, c))(
        state, *(sharding.global_batch(x, mesh, sharding.DEFAULT_RULES) for x in (ids, mask, dec)))
    ours = _jit_generate(model, max_len=32)(ids, mask)
  np.testing.assert_allclose(np.asarray(logits), logits_ref, atol=1e-4)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                      num_beams=1, max_new_tokens=32)
  _assert_same_tokens(np.asarray(ours.tokens), ref.numpy()[:, 1:])


def test_trainable_filter_and_base_state():
  from pixelground.models.lora import base_state, trainable_filter
  cfg = t5_lib.T5Config(vocab_size=40, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_encoder_layers=1,
                        num_decoder_layers=1, relpos_buckets=8, relpos_max_distance=16, lora_rank=2,
                        lora_alpha=4.0, lora_targets=("encoder.attn.q",))
  model = t5_lib.T5(cfg, rngs=nnx.Rngs(0))
  names = lambda state: {loader.path_str(p) for p, _ in loader.flatten_state(state)[0]}
  lora_only = names(nnx.state(model, trainable_filter()))
  assert lora_only == {"encoder.layers.layers.0.attn.q.lora_a", "encoder.layers.layers.0.attn.q.lora_b"}
  with_norm = names(nnx.state(model, trainable_filter(patterns=[r"^decoder\.final_norm\."])))
  assert with_norm == lora_only | {"decoder.final_norm.scale"}
  assert names(nnx.state(model, trainable_filter(lora=False, patterns=[r"lm_head"]))) == {"lm_head"}
  with pytest.raises(ValueError, match="nothing would train"):
    trainable_filter(lora=False)
  base = names(base_state(model))
  assert not base & lora_only and "token_embed" in base and "encoder.layers.layers.0.attn.q.kernel" in base
