"""Web image–text captioning (`Converters.web_caption`): record filters by the record's own fields,
dropped records counted by reason, and the loader path that skips them without wasting batch slots
(`pipeline._DropBatch`), deterministic and resumable."""

import numpy as np
import pytest

from pixelground.config import schema
from pixelground.data import pipeline
from pixelground.data import tasks as task_lib
from pixelground.data.drops import DropCounter
from pixelground.data.tokenizer import load_tokenizer

TOK = load_tokenizer("tiny")
FILTERS = dict(min_caption_tokens=3, max_caption_tokens=12, languages=("en", ""), min_score=0.3,
               min_image_side=16)


def _record(i: int, *, text="a red circle on a blue square", lang="en", score=0.9, side=32):
  img = np.full((side, side + 4, 3), i % 255, np.uint8)
  return {"image": img, "text": text, "language": lang, "score": np.float32(score), "key": f"s/{i}"}


def _converters(**kw):
  cfg = task_lib.TaskConfig(image_size=32, max_prompt_len=8, max_target_len=10, **(FILTERS | kw))
  return task_lib.Converters(cfg, TOK)


def test_each_filter_names_its_reason():
  conv = _converters()
  rng = np.random.default_rng(0)
  cases = {None: _record(0), "language": _record(1, lang="de"), "low_score": _record(2, score=0.1),
           "small_image": _record(3, side=8), "caption_too_short": _record(4, text="a"),
           "caption_too_long": _record(5, text=" ".join(["circle"] * 40))}
  for reason, ex in cases.items():
    out = conv.web_caption(ex, rng)
    if reason is None:
      assert set(out) == set(task_lib.TASK_FIELDS["web_caption"]) - {"token_boxes", "token_box_valid"}
      n = int(out["target_mask"].sum())
      assert 3 <= n <= 10 and out["target_ids"][n - 1] == TOK.eos_id  # cut to max_target_len
    else:
      assert out == {task_lib.DROPPED: task_lib.DROP_REASONS.index(reason)}, (reason, out)
  # Unknown language "" passes when listed; an absent score (-1) fails a positive threshold.
  assert task_lib.DROPPED not in conv.web_caption(_record(6, lang=""), rng)
  assert conv.web_caption(_record(7, score=-1), rng) == {task_lib.DROPPED: 1}
  # Defaults keep everything.
  keep = task_lib.Converters(task_lib.TaskConfig(image_size=32, max_target_len=10), TOK)
  assert all(task_lib.DROPPED not in keep.web_caption(ex, rng) for ex in cases.values())


def _loader(source, *, shard=0, count=1, mixing="example", extra=()):
  conv = _converters()
  schema_ = task_lib.schema(conv.cfg)
  tasks = [pipeline.Task("web", source, conv.web_caption)] + list(extra)
  return pipeline.Loader(tasks, schema_, batch_size=4, seed=0, mixing=mixing, shard_index=shard,
                         shard_count=count, num_epochs=1, shuffle=True, drop_remainder=False,
                         drop_reasons=task_lib.DROP_REASONS)


def _source(n=40):
  bad = {3: dict(lang="fr"), 7: dict(score=0.0), 8: dict(side=4), 11: dict(text="x"), 20: dict(lang="fr"),
         25: dict(text=" ".join(["square"] * 30))}
  return [_record(i, **bad.get(i, {})) for i in range(n)], bad


def test_loader_skips_and_counts_dropped_records():
  source, bad = _source()
  batches = list(_loader(source))
  counts = sum(b[task_lib.DROPPED] for b in batches)
  assert counts.shape == (1, len(task_lib.DROP_REASONS))
  expect = dict(zip(task_lib.DROP_REASONS, [2, 1, 1, 1, 1, 0]))
  assert dict(zip(task_lib.DROP_REASONS, counts[0].tolist())) == expect
  rows = sum(len(b["task_id"]) for b in batches)
  assert rows == len(source) - len(bad)
  assert all(len(b["task_id"]) == 4 for b in batches[:-1])  # every slot holds a kept record
  # The kept images are exactly the good records (pixel value = record index).
  seen = sorted(int(im[0, 0, 0]) for b in batches for im in b["image"][:, :1, :1])
  assert seen == [i for i in range(len(source)) if i not in bad]
  counter = DropCounter(["web"], task_lib.DROP_REASONS)
  for b in batches:
    counter.add(b[task_lib.DROPPED], len(b["task_id"]))
  assert counter.line().startswith(f"filtered: 6 of {len(source)} records read (15.0%) — web: language 2")
  assert counter.scalars()["data/dropped/web/language"] == 2.0


def test_dropping_loader_is_deterministic_and_resumable():
  source, _ = _source()
  a = list(_loader(source))
  b = list(_loader(source))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  it = iter(_loader(source))
  next(it), next(it)
  state = it.get_state()
  rest = list(it)
  it2 = iter(_loader(source))
  it2.set_state(state)
  again = list(it2)
  assert len(rest) == len(again) > 0
  for x, y in zip(rest, again):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x[task_lib.DROPPED], y[task_lib.DROPPED])


def test_processes_read_disjoint_records_and_counts_add_up():
  source, bad = _source()
  parts = [list(_loader(source, shard=s, count=2)) for s in range(2)]
  seen = [sorted(int(im[0, 0, 0]) for b in p for im in b["image"][:, :1, :1]) for p in parts]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == [i for i in range(len(source)) if i not in bad]
  total = sum(b[task_lib.DROPPED] for p in parts for b in p)
  assert int(total.sum()) == len(bad)


def test_filters_only_for_web_caption():
  import os

  from pixelground.config.parse import load_config
  c = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                               "ln_t5xl.py") + ":runlocal")
  c.tasks.caption.min_score = 0.5
  with pytest.raises(schema.ConfigError, match="config.tasks.caption.min_score: record filters apply"):
    schema.parse(c)


def test_drop_counter_windows():
  c = DropCounter(["web"], ["a", "b"])
  c.add(np.asarray([[1, 2]]), 7)
  assert c.scalars() == {"data/dropped/web/a": 1.0, "data/dropped/web/b": 2.0, "data/dropped_fraction": 0.3}
  c.add(np.asarray([[0, 1]]), 9)
  assert c.scalars()["data/dropped/web/b"] == 1.0 and c.scalars()["data/dropped/web/b"] == 0.0
  assert c.line() == "filtered: 4 of 20 records read (20.0%) — web: a 1, b 3"


def test_file_sharding_gives_each_input_shard_whole_files():
  lengths = (5, 3, 7, 4, 6)
  parts = [pipeline.file_shard(lengths, k, 2) for k in range(2)]
  np.testing.assert_array_equal(parts[0], list(range(0, 5)) + list(range(8, 15)) + list(range(19, 25)))
  np.testing.assert_array_equal(parts[1], list(range(5, 8)) + list(range(15, 19)))
  source, bad = _source(25)
  conv = _converters()
  seen = []
  for k in range(2):
    loader = pipeline.Loader([pipeline.Task("web", source, conv.web_caption, file_lengths=lengths)],
                             task_lib.schema(conv.cfg), batch_size=2, seed=0, shard_index=k, shard_count=2,
                             num_epochs=1, drop_remainder=False, drop_reasons=task_lib.DROP_REASONS,
                             shard_by="file")
    got = sorted(int(im[0, 0, 0]) for b in loader for im in b["image"][:, :1, :1])
    assert set(got) <= set(parts[k].tolist())
    seen += got
  assert sorted(seen) == [i for i in range(25) if i not in bad]
  with pytest.raises(ValueError, match="5 files cannot feed 6 input shards"):
    pipeline.Loader([pipeline.Task("web", source, conv.web_caption, file_lengths=lengths)],
                    task_lib.schema(conv.cfg), batch_size=2, seed=0, shard_index=0, shard_count=6,
                    drop_reasons=task_lib.DROP_REASONS, shard_by="file")
