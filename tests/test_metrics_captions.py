"""pixelground.metrics.captions: our numbers equal pycocoevalcap's own output on the same inputs; the
Java-less path (clear error, or fallback without METEOR); METEOR per pair for DenseCap. Java tests:
two METEOR start-ups (~10 s each on a busy 2-core machine) for the module."""

import numpy as np
import pytest

from pixelground.metrics import captions, densecap

pytest.importorskip("pycocoevalcap",
                    reason="needs the COCO caption evaluation package (pip install pycocoevalcap)")
needs_java = pytest.mark.skipif(not captions.java_available(),
                                reason="needs `java` on PATH (PTB tokenizer, METEOR)")

REFS = {
    139: ["A woman wearing a net on her head cutting a cake.", "A woman cutting a large white sheet cake.",
          "A woman wearing a hair net cutting a large sheet cake."],
    285: ["A big burly grizzly bear is show with grass in the background.",
          "The large brown bear has a black nose.", "Closeup of a brown bear sitting in a grassy area."],
    632: ["Bedroom scene with a bookcase, blue comforter and window.",
          "A bedroom with a bookshelf full of books.",
          "This room has a bed with blue sheets and a large bookcase"],
}
PREDS = {139: "a woman cutting a cake with a knife", 285: "a brown bear sitting in the grass",
         632: "a bedroom with a bed and a book shelf"}


@pytest.fixture(scope="module")
def direct_meteor():
  """pycocoevalcap's own METEOR scorer, independent of ours (one ~10 s Java start for the module)."""
  from pycocoevalcap.meteor.meteor import Meteor
  return Meteor()


@needs_java
def test_equal_to_pycocoevalcap_called_directly(direct_meteor):
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  tok = PTBTokenizer()  # as COCOEvalCap.evaluate: tokenise, then each scorer on the same dicts
  gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
  res = tok.tokenize({k: [{"caption": v}] for k, v in PREDS.items()})
  direct = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
  direct["METEOR"] = direct_meteor.compute_score(gts, res)[0]
  direct["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
  direct["CIDEr"] = Cider().compute_score(gts, res)[0]

  ours = captions.caption_metrics(REFS, PREDS)
  assert set(ours) == set(captions.METRICS)
  assert ours == {k: float(v) for k, v in direct.items()}  # exact
  assert 0 < ours["Bleu_4"] < 1 and 0 < ours["METEOR"] < 1 and ours["CIDEr"] > 0


@needs_java
def test_meteor_pairs_equal_the_scorer_and_drive_densecap(direct_meteor):
  pairs = [("a woman cutting a cake", REFS[139]), ("a bear", REFS[285]), ("", ["empty candidate"])]
  ours = captions.meteor_pairs(pairs)
  _, direct = direct_meteor.compute_score({0: REFS[139], 1: REFS[285]}, {0: [pairs[0][0]], 1: [pairs[1][0]]})
  assert ours.tolist() == [float(direct[0]), float(direct[1]), 0.0]
  # The default scorer of the DenseCap evaluator: one exact box with a caption equal to its reference.
  ev = densecap.DenseCapEvaluator()
  ev.add([[0, 0, 10, 10]], [1.0], ["a red car"], [[0, 0, 10, 10]], ["a red car"])
  assert ev.result()["map"] == 1.0


def test_without_java_raises_a_clear_error(monkeypatch):
  monkeypatch.setattr(captions, "java_available", lambda: False)
  with pytest.raises(captions.JavaNotFoundError, match="needs Java"):
    captions.caption_metrics(REFS, PREDS)
  with pytest.raises(captions.JavaNotFoundError, match="METEOR needs Java"):
    captions.meteor_pairs([("a cat", ["a cat"])])


def test_without_java_fallback_skips_meteor(monkeypatch):
  monkeypatch.setattr(captions, "java_available", lambda: False)
  with pytest.warns(RuntimeWarning, match="METEOR skipped"):
    out = captions.caption_metrics(REFS, PREDS, java_fallback=True)
  assert set(out) == set(captions.METRICS) - {"METEOR"}
  assert 0 < out["Bleu_4"] < 1 and out["CIDEr"] > 0
  with pytest.warns(RuntimeWarning, match="METEOR skipped"):
    perfect = captions.caption_metrics({1: ["A cat, on a mat."], 2: ["Two dogs."]},
                                       {1: "a cat on a mat", 2: "two dogs"}, java_fallback=True)
  np.testing.assert_allclose(perfect["ROUGE_L"], 1.0)


def test_simple_tokenize():
  assert captions.simple_tokenize("A man's T-shirt, (red)!\nNice.") == "a man's t-shirt ( red ) nice"


def test_predictions_need_references():
  with pytest.raises(ValueError, match="no references"):
    captions.caption_metrics({1: ["a cat"]}, {1: "a cat", 2: "a dog"})
