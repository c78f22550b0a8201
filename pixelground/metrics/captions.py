"""Caption metrics — BLEU-1..4, METEOR, ROUGE-L, CIDEr — through the COCO caption evaluation package.

Reproduces: salaniz/pycocoevalcap (the pip package of tylin/coco-caption), eval.py `COCOEvalCap.
evaluate`, by calling it: the numbers are pycocoevalcap's own (`pip install pycocoevalcap`): its PTB tokenizer (Stanford CoreNLP,
lower-cased, punctuation removed) and its Bleu(4) / Meteor / Rouge / Cider scorers, called exactly as
its `COCOEvalCap.evaluate` does. SPICE is not computed (it downloads Stanford models on first use).

Java: the PTB tokenizer and METEOR run `java` (found on PATH). Without it `caption_metrics` raises
`JavaNotFoundError`; with `java_fallback=True` it warns, tokenises with `simple_tokenize` instead and
leaves METEOR out — BLEU / ROUGE-L / CIDEr are then close to, but not exactly, the official numbers.

METEOR runs in one Java process per Python process, started on first use and reused (its start-up,
mostly loading the paraphrase table, takes ~10 s).

Captions are keyed by any hashable id (image id, or (image id, region id)); references are lists of
strings, predictions single strings.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import threading
import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

# Key names as pycocoevalcap reports them.
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

# Tokens the PTB tokenizer path drops (pycocoevalcap removes the same punctuation after tokenising).
_PUNCT_TOKENS = frozenset(["''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",",
                           ":", "-", "--", "...", ";"])


_meteor_lock = threading.Lock()
_meteor_scorer = None  # one METEOR Java process per Python process: it takes ~10 s to start


class JavaNotFoundError(RuntimeError):
  """`java` is not on PATH, so the PTB tokenizer and METEOR of pycocoevalcap cannot run."""


def java_available() -> bool:
  return shutil.which("java") is not None


def _require_java(what: str) -> None:
  if not java_available():
    raise JavaNotFoundError(
        f"{what} needs Java: pycocoevalcap runs `java` (PTB tokenizer, METEOR 1.5), and no `java` is on "
        "PATH. Install a Java runtime (e.g. `apt-get install default-jre-headless`), or call "
        "caption_metrics(..., java_fallback=True) to get BLEU / ROUGE-L / CIDEr with a Python tokenizer "
        "and no METEOR.")


def _pycocoevalcap():
  if importlib.util.find_spec("pycocoevalcap") is None:
    raise ImportError("caption metrics need the COCO caption evaluation package: `pip install pycocoevalcap`")


def simple_tokenize(text: str) -> str:
  """Java-free approximation of the PTB path: lower-case, split off punctuation, drop punctuation."""
  text = text.lower().replace("\n", " ")
  # Keep word-internal apostrophes / hyphens ("man's", "t-shirt"); split everything else off.
  tokens = re.findall(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]", text)
  return " ".join(t for t in tokens if t not in _PUNCT_TOKENS)


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
  """{key: [caption, ...]} → {key: [tokenised caption, ...]} with pycocoevalcap's PTBTokenizer (Java)."""
  _pycocoevalcap()
  _require_java("the PTB tokenizer")
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def _meteor():
  """The shared pycocoevalcap Meteor scorer (started on first use, restarted if its process died)."""
  global _meteor_scorer
  _pycocoevalcap()
  _require_java("METEOR")
  from pycocoevalcap.meteor.meteor import Meteor
  with _meteor_lock:
    if _meteor_scorer is None or _meteor_scorer.meteor_p.poll() is not None:
      _meteor_scorer = Meteor()
    return _meteor_scorer


def caption_metrics(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str], *,
                    java_fallback: bool = False) -> dict[str, float]:
  """Corpus-level caption metrics of `predictions` against `references` (COCO caption evaluation).

  Args:
    references: {key: [reference caption, ...]} (at least one per key).
    predictions: {key: predicted caption}. The metrics are over these keys (as COCOEvalCap scores the
      images that have a result); each needs references.
    java_fallback: without Java, warn and return BLEU / ROUGE-L / CIDEr from `simple_tokenize` instead of
      raising `JavaNotFoundError`.

  Returns:
    {"Bleu_1", ..., "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} → float (fractions, CIDEr unscaled: 1.0 =
    100 in papers); "METEOR" is absent in the Java-free fallback.
  """
  _pycocoevalcap()
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  if not predictions:
    raise ValueError("no predictions to score")
  missing = [k for k in predictions if not references.get(k)]
  if missing:
    raise ValueError(f"{len(missing)} predictions have no references, e.g. {missing[:3]}")
  refs = {k: list(references[k]) for k in predictions}
  preds = {k: [predictions[k]] for k in predictions}
  use_java = java_available()
  if not use_java and not java_fallback:
    _require_java("caption_metrics")
  if use_java:
    gts, res = ptb_tokenize(refs), ptb_tokenize(preds)
  else:
    warnings.warn("no `java` on PATH: captions tokenised by simple_tokenize (not the PTB tokenizer) and "
                  "METEOR skipped; BLEU / ROUGE-L / CIDEr are approximate", RuntimeWarning, stacklevel=2)
    gts = {k: [simple_tokenize(c) for c in v] for k, v in refs.items()}
    res = {k: [simple_tokenize(c) for c in v] for k, v in preds.items()}
  out: dict[str, float] = {}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
  if use_java:
    out["METEOR"] = float(_meteor().compute_score(gts, res)[0])
  out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
  out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
  return out


def _clean(s: str) -> str:
  # METEOR's stdio protocol separates fields by "|||" and records by newlines.
  return " ".join(s.replace("|||", " ").split())


def meteor_pairs(pairs: Sequence[tuple[str, Sequence[str]]]) -> np.ndarray:
  """METEOR 1.5 of each (candidate, [references]) pair, in one batch through the shared METEOR process.

  Raw strings are scored: only METEOR's own `-norm` normalisation (lower-casing, punctuation), no PTB
  tokenizer. An empty candidate or an empty reference list scores 0.

  Returns:
    (N,) float64 in [0, 1].
  """
  out = np.zeros(len(pairs))
  todo = {i: (_clean(c), [_clean(r) for r in refs]) for i, (c, refs) in enumerate(pairs)}
  todo = {i: (c, [r for r in refs if r]) for i, (c, refs) in todo.items()}
  todo = {i: v for i, v in todo.items() if v[0] and v[1]}
  if not todo:
    return out
  _, scores = _meteor().compute_score({i: refs for i, (_, refs) in todo.items()},
                                      {i: [c] for i, (c, _) in todo.items()})
  out[list(todo)] = scores
  return out
