"""Pretrained files through the trainer (`config.weights`) and staged initialisation (`config.init_from`).

The reference models (transformers `SamModel` re-keyed to segment-anything's original `.pth` layout,
timm `Eva`, transformers `T5ForConditionalGeneration`) are built with random weights at the
`ln_t5xl:runlocal` / `refseg_t5xl:runlocal` sizes and saved in their real file formats. After the
import every imported parameter of the train state is checked against its file tensor two ways: equal
to what the standalone loader (parity-tested against the same references in test_sam_original /
test_eva02 / test_t5) produces, and holding exactly the file tensor's values (a check that does not go
through any layout conversion)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pixelground.checkpoints import eva02 as eva_ckpt, sam as sam_ckpt, sam_decoder as dec_ckpt  # noqa: E402
from pixelground.checkpoints import t5 as t5_ckpt  # noqa: E402
from pixelground.checkpoints.sources import open_source  # noqa: E402
from pixelground.config import schema  # noqa: E402
from pixelground.config.parse import load_config  # noqa: E402
from pixelground.parallel import sharding  # noqa: E402
from pixelground.training import train_state, weights  # noqa: E402
from test_eva02 import _build as build_eva, timm_eva  # noqa: E402,F401  (fixture)
from test_sam_original import _hf_sam, _to_original  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory, timm_eva):
  """{"sam": original-layout .pth, "eva": timm .safetensors, "t5": HF directory} at runlocal sizes."""
  root = tmp_path_factory.mktemp("pretrained")
  sam = _hf_sam(dict(hidden_size=32, num_attention_heads=2, image_size=128, patch_size=16,
                     output_channels=32, num_hidden_layers=2, window_size=2, global_attn_indexes=[1],
                     mlp_dim=128, num_pos_feats=16),
                dict(hidden_size=32, num_attention_heads=2, mlp_dim=64, num_hidden_layers=2,
                     iou_head_hidden_dim=32),
                dict(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=8), seed=1)
  torch.save(_to_original(sam.state_dict()), root / "sam_vit_tiny.pth")
  eva = build_eva(timm_eva, 2, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                  mlp_ratio=85 / 32, use_fc_norm=False)  # final norm, as eva02-l-14
  save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, str(root / "eva02.safetensors"))
  torch.manual_seed(3)
  t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=896, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=2,
      relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1))
  t5.config.tie_word_embeddings = False  # FLAN-T5 files hold their own lm_head (test_t5's "untied")
  t5.lm_head.weight = torch.nn.Parameter(torch.randn(896, 64) * 0.5)
  t5.save_pretrained(root / "flan-t5-tiny")
  return {"sam": str(root / "sam_vit_tiny.pth"), "eva": str(root / "eva02.safetensors"),
          "t5": str(root / "flan-t5-tiny")}


def _config(name: str, files: dict, **extra):
  c = load_config(os.path.join(ROOT, "configs", f"{name}.py:runlocal"))
  for k, v in files.items():
    c.weights[k] = v
  for k, v in extra.items():
    c.init_from[k] = v
  return schema.parse(c)


def _file_tensors(path: str) -> dict[str, np.ndarray]:
  with open_source(path) as src:
    return {k: np.asarray(src.read(k), np.float32) for k in src.keys()}


def _check_import(config, files):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  setup = train_state.build_setup(config, mesh)
  state = train_state.init_state(setup)
  state, reports = weights.import_weights(setup, state, config.weights)
  flat = {".".join(map(str, p)): v.get_value() for g in ("params", "frozen")
          for p, v in nnx.to_flat_state(state[g])}
  cfg = setup.cfg
  standalone = {
      "sam_encoder": sam_ckpt.load_sam_image_encoder(files["sam"], cfg.sam, report=(sam_rep := {})),
      "eva": eva_ckpt.load_eva02(files["eva"], cfg.eva, report=(eva_rep := {})),
      "t5": t5_ckpt.load_t5(files["t5"], cfg.t5, report=(t5_rep := {}))}
  dec = dec_ckpt.load_sam_decoder(files["sam"], cfg.prompt, report=(dec_rep := {}))
  standalone["prompt_encoder"] = dec.prompt_encoder
  if cfg.refseg or cfg.lisa:
    standalone["mask_decoder"] = dec.mask_decoder
  raw = {k: _file_tensors(v) for k, v in files.items() if k in ("sam", "eva")}
  raw["t5"] = _file_tensors(os.path.join(files["t5"], "model.safetensors"))
  sources = {"sam_encoder": ("sam", sam_rep, ""), "eva": ("eva", eva_rep, ""), "t5": ("t5", t5_rep, ""),
             "prompt_encoder": ("sam", dec_rep, "prompt_encoder."),
             "mask_decoder": ("sam", dec_rep, "mask_decoder.")}
  checked = 0
  for part, module in standalone.items():
    file_key, rep, prefix = sources[part]
    for p, var in nnx.to_flat_state(nnx.state(module)):  # parameters and fixed buffers (SAM's PE)
      if isinstance(var, nnx.LoRAParam):
        continue
      name = f"{part}.{'.'.join(map(str, p))}"
      ours = np.asarray(flat[name].astype(np.float32))
      np.testing.assert_array_equal(ours, np.asarray(var.get_value().astype(np.float32)), err_msg=name)
      # The file's own values, whatever the layout conversion: each parameter's values, cast to its
      # dtype, are the multiset of its source tensors' values (a subset for a split fused qkv).
      keys = rep["loaded"][prefix + ".".join(map(str, p))]
      src = np.concatenate([raw[file_key][k].ravel() for k in keys]).astype(flat[name].dtype)
      src = np.sort(src.astype(np.float32))
      got = np.sort(ours.ravel())
      if got.size == src.size:
        np.testing.assert_array_equal(got, src, err_msg=name)
      else:
        assert np.isin(got, src).all(), name
      checked += 1
  # Every non-LoRA parameter of the imported parts was compared.
  imported = [n for n in flat if n.split(".")[0] in standalone and ".lora_" not in n]
  assert checked == len(imported), (checked, len(imported))
  return reports, checked


def test_ln_import_is_complete_and_exact(files):
  reports, checked = _check_import(_config("ln_t5xl", files), files)
  text = "\n".join(weights.format_report(r) for r in reports)
  print(text)
  sam = next(r for r in reports if "weights.sam" in r.source)
  # The ln model has no mask decoder: the file's mask-decoder tensors are listed as unused.
  assert sam.ignored and all(k.startswith("mask_decoder.") for k in sam.ignored)
  assert checked > 100 and "ignored" in text


def test_refseg_import_takes_the_mask_decoder(files):
  reports, _ = _check_import(_config("refseg_t5xl", files), files)
  sam = next(r for r in reports if "weights.sam" in r.source)
  assert any(n.startswith("mask_decoder.") for n in sam.loaded)
  assert not [k for k in sam.ignored if k.startswith("mask_decoder.")]


def test_a_parameter_that_does_not_fit_is_an_error(files):
  # A mask-detail branch: the hypernetworks emit 4 more weights per mask than any SAM file holds.
  c = load_config(os.path.join(ROOT, "configs", "refseg_t5xl.py:runlocal"))
  c.weights.sam = files["sam"]
  c.model.mask_detail = 4
  config = schema.parse(c)
  setup = train_state.build_setup(config, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                             devices=jax.devices()[:1]))
  with pytest.raises(weights.WeightsError) as e:
    weights.import_weights(setup, train_state.init_state(setup), config.weights)
  msg = str(e.value)
  assert "8 with another shape: mask_decoder.hypernets.0.proj_out.bias (4,) in the file, (8,)" in msg


def _train(name, workdir, files, *extra, env=None):
  cmd = [sys.executable, "-m", "pixelground.train", f"--config=configs/{name}.py:runlocal",
         f"--workdir={workdir}", *(f"--config.weights.{k}={v}" for k, v in files.items()), *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_renamed_key_fails_the_run_naming_it(files, tmp_path, cli_env):
  state = torch.load(files["sam"], weights_only=True)
  key = "image_encoder.blocks.1.attn.qkv.weight"
  state["image_encoder.blocks.1.attn.qkv_proj.weight"] = state.pop(key)
  bad = dict(files, sam=str(tmp_path / "renamed.pth"))
  torch.save(state, bad["sam"])
  p = _train("ln_t5xl", tmp_path / "run", {"sam": bad["sam"]}, env=cli_env)
  assert p.returncode != 0
  assert key in p.stderr and "renamed.pth" in p.stderr, p.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ln_t5xl", "refseg_t5xl"])
def test_trains_through_the_cli(files, tmp_path, cli_env, name):
  import orbax.checkpoint as ocp

  p = _train(name, tmp_path / "run", files, "--config.optimizer.total_steps=20", env=cli_env)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "config.weights.sam = " in p.stdout and "config.weights.t5 = " in p.stdout
  result = __import__("json").loads(p.stdout.strip().splitlines()[-1])
  assert result["step"] == 20
  # Frozen imported weights come out of training as they went in: the file's tensors.
  saved = ocp.StandardCheckpointer().restore(str(tmp_path / "run" / "checkpoints" / "20" / "state"))
  enc = sam_ckpt.load_sam_image_encoder(files["sam"], schema.parse(
      os.path.join(ROOT, "configs", f"{name}.py:runlocal")).model.sam)
  for path, var in nnx.to_flat_state(nnx.state(enc, nnx.Param)):
    node = saved["frozen"]["sam_encoder"]
    for k in path:
      node = node[str(k)]
    np.testing.assert_array_equal(np.asarray(node["value"]), np.asarray(var.get_value()))
