"""pixelground.data.text_flip: left / right swaps under a horizontal flip, and the texts a flip must not
touch."""

import pytest

from pixelground.data import text_flip


@pytest.mark.parametrize("text,flipped", [
    ("the man on the left", "the man on the right"),
    ("Left dog", "Right dog"),
    ("RIGHT cup", "LEFT cup"),
    ("the left-hand side of the table", "the right-hand side of the table"),
    ("Left-hand side", "Right-hand side"),
    ("rightmost car, next to the leftmost one", "leftmost car, next to the rightmost one"),
    ("moving leftwards", "moving rightwards"),
    ("from left to right", "from right to left"),
    ("the top-left corner", "the top-right corner"),
    ("bright light, cleft rock, copyright", "bright light, cleft rock, copyright"),
    ("leftover pizza", "leftover pizza"),
    ("", ""),
])
def test_flip_text(text, flipped):
  assert text_flip.flip_text(text) == flipped
  assert text_flip.flip_text(text_flip.flip_text(text)) == text


@pytest.mark.parametrize("text", [
    "the man on the left", "left guy", "dog right", "the dog is left of the cat", "his right hand",
    "second from left", "cup on the right next to the plate", "left and right sides", "top-left corner",
    "the bird's right wing", "person in a red shirt", "rightmost car", "turn left at the sign",
])
def test_flip_allowed(text):
  assert text_flip.flip_allowed(text)


@pytest.mark.parametrize("text", [
    "the east side of the building", "West wing", "a north-east facing window", "turning clockwise",
    "counter-clockwise arrow", "the man who left", "nothing left on the plate", "he stood up and left",
    "the man left behind", "that's right", "all right then", "right now", "cup right next to the plate",
    "a right angle",
])
def test_flip_refused(text):
  assert not text_flip.flip_allowed(text)
