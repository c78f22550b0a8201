"""Text under a horizontal image flip: `flip_text` swaps "left" / "right" (and the like) keeping case;
`flip_allowed` is False for text whose meaning a flip breaks with no safe swap (east / west, clockwise,
"left" as the verb "leave", "right" as "correct", ...), so the flip must not happen."""

from __future__ import annotations

import re

LEFT_RIGHT = {
    "left": "right", "right": "left",
    "leftmost": "rightmost", "rightmost": "leftmost",
    "lefthand": "righthand", "righthand": "lefthand",
    "leftward": "rightward", "rightward": "leftward",
    "leftwards": "rightwards", "rightwards": "leftwards",
    "lefty": "righty", "righty": "lefty",
}

_SWAP_RE = re.compile(r"\b(" + "|".join(sorted(LEFT_RIGHT, key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)


def _match_case(template: str, word: str) -> str:
  if template.isupper() and len(template) > 1:
    return word.upper()
  if template[:1].isupper():
    return word[:1].upper() + word[1:]
  return word


def flip_text(text: str) -> str:
  """Swaps left ↔ right (leftmost ↔ rightmost, left-hand ↔ right-hand, leftwards ↔ rightwards, …)
  as whole words, keeping the case pattern ("Left" → "Right", "LEFT" → "RIGHT"). Swapping twice is the
  identity. Whether the swap is meaningful is `flip_allowed`'s business."""
  return _SWAP_RE.sub(lambda m: _match_case(m.group(0), LEFT_RIGHT[m.group(0).lower()]), text)


# Words whose meaning a horizontal flip breaks and that have no safe swap.
_UNSAFE_RE = re.compile(
    r"\b(east|west|eastern|western|eastward|westward|eastwards|westwards|eastbound|westbound|"
    r"northeast|northwest|southeast|southwest|northeastern|northwestern|southeastern|southwestern|"
    r"clockwise|counterclockwise|anticlockwise|widdershins)\b", re.IGNORECASE)
# "north-east" etc. are caught by "east"/"west" through the hyphen word boundary.

_WORD_RE = re.compile(r"[A-Za-z]+")
_SIDE = {"left", "right"}
# After these "left" is (almost always) the verb "leave": "the man who left", "nothing left".
_LEFT_VERB_BEFORE = {
    "who", "which", "he", "she", "they", "we", "i", "you", "has", "have", "had", "having", "been",
    "being", "was", "were", "is", "are", "be", "get", "gets", "got", "just", "nothing", "anything",
    "something", "everything", "none", "never", "already", "s", "ve", "d", "recently", "then", "and",
    "finally", "soon",
}
_LEFT_VERB_AFTER = {"behind", "over", "alone", "unattended", "out", "open", "untouched", "empty",
                    "home", "early", "town", "after", "by", "for", "with", "in", "him", "her", "them",
                    "me", "us", "it", "this", "a", "an"}
# After these "right" means "correct"/"exactly"/"a right": "all right", "that's right", "is right."
_RIGHT_IDIOM_BEFORE = {"all", "s", "exactly", "quite", "absolutely", "is", "are", "was", "were", "be",
                       "not", "human", "civil", "equal", "so", "re"}
_RIGHT_IDIOM_AFTER = {"now", "away", "angle", "angles", "angled", "triangle", "triangles", "answer",
                      "time", "place", "thing", "things", "choice", "moment", "amount", "size", "track",
                      "then"}
# "right next to", "right behind", ...: the intensifier, unless the word before makes it a side.
_INTENSIFIED = {"next", "behind", "in", "above", "below", "before", "after", "beside", "across",
                "through", "into", "under", "over", "at", "by", "up", "down", "off", "there", "here",
                "back", "on", "between", "against", "outside", "inside", "near", "along", "onto",
                "underneath", "beneath", "where", "around", "out", "to"}
# Words after which left/right name a side: "the left", "upper right", "turn left", "his right".
_SIDE_BEFORE = {"the", "to", "on", "at", "from", "far", "your", "his", "her", "its", "their", "my",
                "our", "a", "bottom", "top", "upper", "lower", "middle", "center", "centre", "extreme",
                "front", "back", "rear", "toward", "towards", "slightly", "turn", "turns", "turned",
                "turning", "facing", "faces", "face", "looking", "looks", "look", "pointing", "points",
                "point", "leaning", "leans", "lean", "moving", "moves", "move", "going", "goes", "go",
                "heading", "heads", "headed", "tilted", "tilting", "tilts", "veering", "veers", "keep",
                "keeps", "very", "furthest", "farthest", "second", "third", "first",
                "image", "picture", "photo", "frame", "bottommost", "topmost"}
# "'s" after these is "is"/"has" ("that's right", "he's left"); otherwise it is a possessive.
_S_IS = {"that", "it", "he", "she", "what", "who", "there", "here", "everything", "nothing", "one"}
# Words after which left/right name a side whatever came before: "is left of", "right hand".
_SIDE_AFTER = {"of", "side", "sides", "hand", "hands", "handed", "corner", "corners", "edge", "edges",
               "half", "part", "portion", "most", "arm", "arms", "leg", "legs", "eye", "eyes", "ear",
               "ears", "foot", "feet", "shoulder", "shoulders", "lane", "column", "row"}


def flip_allowed(text: str) -> bool:
  """Whether a horizontally flipped image may be described by `flip_text(text)`.

  False when the text names absolute or rotational directions that a mirror breaks and that cannot be
  swapped (east/west and compounds, clockwise/anticlockwise), or uses "left"/"right" in a sense that
  must not be swapped: "left" as the verb ("the man who left", "nothing left", "left behind") and
  "right" as "correct"/"exactly" ("all right", "that's right", "right now", "right next to" unless
  preceded by a side-marking word as in "on the right next to"). Conservative: grounding text that
  might become wrong is refused rather than flipped.
  """
  if _UNSAFE_RE.search(text):
    return False
  words = [w.lower() for w in _WORD_RE.findall(text)]
  for i, word in enumerate(words):
    if word not in _SIDE:
      continue
    prev = words[i - 1] if i > 0 else ""
    nxt = words[i + 1] if i + 1 < len(words) else ""
    nxt2 = words[i + 2] if i + 2 < len(words) else ""
    prev2 = words[i - 2] if i > 1 else ""
    if (nxt in ("and", "or", "to") and nxt2 in _SIDE) or (prev in ("and", "or", "to") and prev2 in _SIDE):
      continue  # "left to right", "left or right"
    if prev == "s" and prev2 not in _S_IS:
      prev = "his"  # possessive: "the bird's right wing"
    if nxt in _SIDE_AFTER:
      continue
    if prev in _SIDE_BEFORE:
      if word == "right" and nxt in _RIGHT_IDIOM_AFTER and prev not in {"to", "on", "at", "far", "his",
                                                                         "her", "their", "your", "my"}:
        return False  # "the right time", "a right angle" (but "to the right now" is a side)
      continue
    if word == "left":
      if prev in _LEFT_VERB_BEFORE or nxt in _LEFT_VERB_AFTER:
        return False
    else:
      if prev in _RIGHT_IDIOM_BEFORE and nxt not in ("of", "side", "hand", "handed"):
        return False
      if nxt in _RIGHT_IDIOM_AFTER or nxt in _INTENSIFIED:
        return False
  return True
