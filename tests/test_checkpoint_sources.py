"""Tests for pixelground.checkpoints: format detection and lazy per-tensor reads."""

import json
import os
import struct

import ml_dtypes
import msgpack
import numpy as np
import pytest

from pixelground.checkpoints import open_source, save_t5x_checkpoint
from pixelground.checkpoints.sources import SafetensorsSource, TorchBinSource
from pixelground.checkpoints.t5x import LegacyT5XSource, OrbaxT5XSource

torch = pytest.importorskip("torch")


def _rng_arrays():
  rng = np.random.default_rng(0)
  return {
      "dense/kernel": rng.standard_normal((3, 5)).astype(np.float32),
      "dense/bias": rng.standard_normal((5,)).astype(np.float16),
      "ids": rng.integers(-9, 9, size=(2, 2, 2)).astype(np.int64),
      "f64": rng.standard_normal((4,)),
      "i32": rng.integers(-9, 9, size=(3,)).astype(np.int32),
      "i16": rng.integers(-9, 9, size=(3,)).astype(np.int16),
      "i8": rng.integers(-9, 9, size=(3,)).astype(np.int8),
      "u8": rng.integers(0, 255, size=(6,)).astype(np.uint8),
      "mask": rng.integers(0, 2, size=(2, 3)).astype(bool),
      "scalar": np.array(1.5, np.float32),
      "empty": np.zeros((0, 4), np.float32),
  }


def _check_matches(src, expected: dict):
  assert src.keys() == sorted(expected)
  for k, v in expected.items():
    assert k in src
    assert src.shape(k) == v.shape, k
    assert src.dtype(k) == v.dtype, k
    got = src.read(k)
    assert got.dtype == v.dtype and got.shape == v.shape, k
    np.testing.assert_array_equal(got, v, err_msg=k)


def _bf16(shape, seed=1):
  return np.random.default_rng(seed).standard_normal(shape).astype(ml_dtypes.bfloat16)


def _torch_bf16(arr):
  return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_single_file_numpy_and_torch(tmp_path):
  from safetensors.numpy import save_file as save_np
  from safetensors.torch import save_file as save_pt

  arrays = _rng_arrays()
  save_np(arrays, str(tmp_path / "np.safetensors"))
  with open_source(tmp_path / "np.safetensors") as src:
    assert isinstance(src, SafetensorsSource)
    _check_matches(src, arrays)

  bf = _bf16((4, 3))
  save_pt({"w_bf16": _torch_bf16(bf), "b": torch.arange(3, dtype=torch.float32)},
          str(tmp_path / "pt.safetensors"))
  with open_source(tmp_path / "pt.safetensors") as src:
    assert src.dtype("w_bf16") == np.dtype(ml_dtypes.bfloat16)
    _check_matches(src, {"w_bf16": bf, "b": np.arange(3, dtype=np.float32)})

  # Directory with model.safetensors.
  d = tmp_path / "hfdir"
  d.mkdir()
  os.rename(tmp_path / "np.safetensors", d / "model.safetensors")
  with open_source(d) as src:
    _check_matches(src, arrays)
    with pytest.raises(KeyError, match=r"nope.*hfdir"):
      src.read("nope")
    with pytest.raises(KeyError, match="nope"):
      src.shape("nope")
    with pytest.raises(KeyError, match="nope"):
      src.dtype("nope")


def _write_sharded(d, arrays, groups):
  from safetensors.numpy import save_file as save_np
  weight_map = {}
  for i, names in enumerate(groups):
    shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    save_np({k: arrays[k] for k in names}, str(d / shard))
    weight_map.update({k: shard for k in names})
  index = {"metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
           "weight_map": weight_map}
  (d / "model.safetensors.index.json").write_text(json.dumps(index))


def test_safetensors_sharded_index(tmp_path):
  arrays = _rng_arrays()
  names = sorted(arrays)
  _write_sharded(tmp_path, arrays, [names[::2], names[1::2]])
  with open_source(tmp_path) as src:
    _check_matches(src, arrays)
    with pytest.raises(KeyError, match="missing_tensor"):
      src.read("missing_tensor")
  with open_source(tmp_path / "model.safetensors.index.json") as src:
    _check_matches(src, arrays)

  # A shard that the index lists but that is gone: name both file and a key.
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors.*" + names[1]):
    open_source(tmp_path)


def _raw_safetensors(path, header: dict, data: bytes):
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_safetensors_corrupt_files(tmp_path):
  from safetensors.numpy import save_file as save_np
  good = tmp_path / "good.safetensors"
  save_np({"w": np.ones((8, 8), np.float32)}, str(good))
  raw = good.read_bytes()

  truncated_header = tmp_path / "trunc_header.safetensors"
  truncated_header.write_bytes(raw[:20])
  with pytest.raises(ValueError, match="trunc_header.safetensors"):
    open_source(truncated_header)

  tiny = tmp_path / "tiny.safetensors"
  tiny.write_bytes(raw[:5])
  with pytest.raises(ValueError, match="tiny.safetensors"):
    open_source(tiny)

  truncated_data = tmp_path / "trunc_data.safetensors"
  truncated_data.write_bytes(raw[:-10])
  with pytest.raises(ValueError, match=r"trunc_data\.safetensors.*'w'"):
    open_source(truncated_data)

  bad_offsets = tmp_path / "bad_offsets.safetensors"
  _raw_safetensors(bad_offsets, {"x": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}},
                   bytes(16))
  with pytest.raises(ValueError, match=r"bad_offsets\.safetensors.*'x'.*12 bytes.*16"):
    open_source(bad_offsets)

  bad_json = tmp_path / "bad_json.safetensors"
  bad_json.write_bytes(struct.pack("<Q", 4) + b"{{{{")
  with pytest.raises(ValueError, match="bad_json.safetensors"):
    open_source(bad_json)

  # A hand-written valid file reads back (checks our header parsing, not just the library's).
  ok = tmp_path / "hand.safetensors"
  data = np.arange(6, dtype=np.int16).tobytes()
  _raw_safetensors(ok, {"__metadata__": {"format": "np"},
                        "v": {"dtype": "I16", "shape": [2, 3], "data_offsets": [0, 12]}}, data)
  with open_source(ok) as src:
    np.testing.assert_array_equal(src.read("v"), np.arange(6, dtype=np.int16).reshape(2, 3))


# ----------------------------------------------------------------------------- pytorch .bin


def _torch_state():
  return {
      "a.weight": torch.randn(4, 3),
      "a.bias": torch.randn(3, dtype=torch.float64),
      "emb": _torch_bf16(_bf16((5, 2))),
      "count": torch.tensor(7, dtype=torch.int64),
      "flags": torch.tensor([True, False]),
      "half": torch.randn(2, 2).half(),
  }


def _torch_expected(state):
  out = {}
  for k, t in state.items():
    if t.dtype == torch.bfloat16:
      out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      out[k] = t.numpy()
  return out


def test_pytorch_bin_single(tmp_path):
  state = _torch_state()
  torch.save(state, tmp_path / "pytorch_model.bin")
  with open_source(tmp_path) as src:
    assert isinstance(src, TorchBinSource)
    _check_matches(src, _torch_expected(state))
    with pytest.raises(KeyError, match=r"zzz.*pytorch_model\.bin"):
      src.read("zzz")
  with open_source(tmp_path / "pytorch_model.bin") as src:
    assert src.dtype("emb") == np.dtype(ml_dtypes.bfloat16)


def test_pytorch_bin_sharded_keeps_one_shard(tmp_path):
  state = _torch_state()
  names = sorted(state)
  groups = [names[:3], names[3:]]
  weight_map = {}
  for i, group in enumerate(groups):
    shard = f"pytorch_model-{i + 1:05d}-of-00002.bin"
    torch.save({k: state[k] for k in group}, tmp_path / shard)
    weight_map.update({k: shard for k in group})
  (tmp_path / "pytorch_model.bin.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  expected = _torch_expected(state)
  with open_source(tmp_path) as src:
    _check_matches(src, expected)
    src.read(groups[0][0])
    assert src._loaded_path.endswith("00001-of-00002.bin")
    assert set(src._loaded) == set(groups[0])  # the other shard was dropped
    src.read(groups[1][0])
    assert set(src._loaded) == set(groups[1])

  os.remove(tmp_path / "pytorch_model-00001-of-00002.bin")
  with pytest.raises(FileNotFoundError, match=r"pytorch_model-00001-of-00002\.bin.*" + names[0]):
    open_source(tmp_path)


# ----------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def t5_model():
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                 num_heads=2)
  return transformers.T5ForConditionalGeneration(config).eval()


def test_transformers_t5_save_pretrained_sharded_safetensors(tmp_path, t5_model):
  t5_model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) >= 2
  state = t5_model.state_dict()
  with open_source(tmp_path) as src:
    keys = set(src.keys())
    # transformers 5.23 writes 47 of the 50 state-dict tensors: `shared.weight`
    # is kept, while its tied aliases `encoder.embed_tokens.weight`,
    # `decoder.embed_tokens.weight` and `lm_head.weight` (tie_word_embeddings
    # defaults to True for T5) are dropped. Everything else uses the usual
    # names, e.g. `encoder.block.0.layer.0.SelfAttention.q.weight` ([inner_dim,
    # d_model], torch Linear layout) and
    # `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`.
    assert keys <= set(state)
    assert "shared.weight" in keys
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    for k in sorted(keys):
      np.testing.assert_array_equal(src.read(k), state[k].numpy(), err_msg=k)
      assert src.dtype(k) == np.float32 and src.shape(k) == tuple(state[k].shape)
    shared = state["shared.weight"]
    for k in set(state) - keys:
      # Anything not written must be an alias of a written tensor.
      assert state[k].data_ptr() == shared.data_ptr(), k


def test_transformers_t5_pytorch_bin(tmp_path, t5_model):
  # transformers 5 ignores safe_serialization=False (it always writes safetensors),
  # so the legacy pytorch_model.bin is produced the way older versions did.
  state = t5_model.state_dict()
  torch.save(state, tmp_path / "pytorch_model.bin")
  with open_source(tmp_path) as src:
    # torch.save keeps every name, tied aliases included (they share storage).
    assert src.keys() == sorted(state)
    for k, t in state.items():
      np.testing.assert_array_equal(src.read(k), t.numpy(), err_msg=k)


# ----------------------------------------------------------------------------- T5X


def _t5x_target():
  rng = np.random.default_rng(3)
  return {
      "encoder/layers_0/attention/query/kernel": rng.standard_normal((16, 8)).astype(np.float32),
      "encoder/relpos_bias/rel_embedding": rng.standard_normal((2, 32)).astype(np.float32),
      "token_embedder/embedding": _bf16((64, 16)),
      "decoder/logits_dense/kernel": rng.standard_normal((16, 64)).astype(np.float32),
      "decoder/layers_0/pre_mlp_layer_norm/scale": np.ones((16,), np.float32),
      "counts": np.arange(6, dtype=np.int32).reshape(2, 3),
      "scalar": np.array(2.5, np.float32),
  }


def _expected_t5x(target):
  return {f"target/{k}": v for k, v in target.items()}


def test_t5x_legacy_roundtrip_and_format(tmp_path):
  target = _t5x_target()
  ckpt = tmp_path / "model" / "checkpoint_100"
  save_t5x_checkpoint(ckpt, target, step=100, layout="legacy")

  for where in (ckpt, ckpt / "checkpoint", tmp_path / "model"):
    with open_source(where) as src:
      assert isinstance(src, LegacyT5XSource)
      _check_matches(src, _expected_t5x(target))
      with pytest.raises(KeyError, match=r"target/nope.*checkpoint_100"):
        src.read("target/nope")

  # The `checkpoint` file is plain msgpack with T5X's structure.
  raw = (ckpt / "checkpoint").read_bytes()
  top = msgpack.unpackb(raw, raw=False, strict_map_key=False)
  assert set(top) == {"version", "optimizer"} and top["version"] == 3
  assert set(top["optimizer"]) == {"target", "state"}
  assert set(top["optimizer"]["state"]) == {"step", "param_states"}
  spec = top["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  assert spec["driver"] == "zarr" and spec["dtype"] == "float32"
  assert spec["kvstore"]["driver"] == "file"
  rel = spec["kvstore"]["path"].rstrip("/")
  assert rel == "target.encoder.layers_0.attention.query.kernel"
  assert spec["metadata"]["shape"] == [16, 8]
  assert (ckpt / rel / ".zarray").is_file()
  emb = top["optimizer"]["target"]["token_embedder"]["embedding"]
  assert emb["dtype"] == "bfloat16"

  from flax import serialization
  restored = serialization.msgpack_restore(raw)
  assert int(restored["optimizer"]["state"]["step"]) == 100

  with pytest.raises(FileExistsError):
    save_t5x_checkpoint(ckpt, target, layout="legacy")


def test_t5x_legacy_inline_arrays_and_relocation(tmp_path):
  target = _t5x_target()
  ckpt = tmp_path / "a" / "checkpoint_0"
  save_t5x_checkpoint(ckpt, target, layout="legacy", inline_below_bytes=100)
  top = msgpack.unpackb((ckpt / "checkpoint").read_bytes(), strict_map_key=False)
  assert isinstance(top["optimizer"]["target"]["scalar"], msgpack.ExtType)  # inline
  assert isinstance(top["optimizer"]["target"]["counts"], msgpack.ExtType)
  assert not (ckpt / "target.scalar").exists()
  # Paths in the specs are relative, so the checkpoint can be moved.
  moved = tmp_path / "b"
  os.rename(tmp_path / "a", moved)
  with open_source(moved / "checkpoint_0") as src:
    _check_matches(src, _expected_t5x(target))


def test_t5x_orbax_roundtrip(tmp_path):
  target = _t5x_target()
  ckpt = tmp_path / "checkpoint_5"
  save_t5x_checkpoint(ckpt, target, step=5, layout="orbax")
  assert (ckpt / "state" / "_METADATA").is_file()
  assert (ckpt / "state" / "manifest.ocdbt").is_file()
  for where in (ckpt, ckpt / "state", tmp_path):
    with open_source(where) as src:
      assert isinstance(src, OrbaxT5XSource)
      # Only parameters: the `state/step` leaf is not exposed.
      _check_matches(src, _expected_t5x(target))
      with pytest.raises(KeyError, match="target/missing"):
        src.shape("target/missing")


def test_t5x_writer_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match="target/"):
    save_t5x_checkpoint(tmp_path / "x", {"target/a": np.zeros(2)})
  with pytest.raises(ValueError, match="a/b"):
    save_t5x_checkpoint(tmp_path / "y", {"a": np.zeros(2), "a/b": np.zeros(2)})
  with pytest.raises(ValueError, match="layout"):
    save_t5x_checkpoint(tmp_path / "z", {"a": np.zeros(2)}, layout="zarr")


# ----------------------------------------------------------------------------- detection


def test_open_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does-not-exist"):
    open_source(tmp_path / "does-not-exist")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty.*model\.safetensors.*pytorch_model\.bin"):
    open_source(empty)
  other = tmp_path / "weights.npz"
  other.write_bytes(b"x")
  with pytest.raises(ValueError, match=r"weights\.npz"):
    open_source(other)
