"""Trains the project's small SentencePiece model (tiny configs; SPEC 4.2).

    python -m pixelground.data.train_tokenizer --out pixelground/data/vocab/tiny --vocab_size 2000 \
        [--corpus FILES...] [--num_scenes 300] [--seed 0]

Writes OUT.model and OUT.vocab (piece<TAB>score per id). Unigram model with T5's conventions: pad = 0,
eos = 1, unk = 2, no BOS, nmt_nfkc normalisation, full character coverage. Reserved (USER_DEFINED)
symbols right after unk, in this order: `[SEG]` = 3, `[REGION]` = 4, `[TASK_0]`..`[TASK_7]` = 5..12,
`<extra_id_0>`..`<extra_id_15>` = 13..28 (`RESERVED`); `pixelground.data.tokenizer` gives added tokens
these ids. `--vocab_size` is a soft limit (hard_vocab_limit off): a small corpus may yield fewer pieces.

Corpus: the text files given with --corpus (one sentence per line), or by default the project's own
text: a grounded_shapes dataset generated into a temporary directory (`--num_scenes` training scenes:
Localized Narratives captions and utterances, COCO-style captions, RefCOCO expressions, ReasonSeg
queries) followed by `builtin_sentences()` (generic English caption text, so common words exist).
Deterministic: fixed corpus order, no input shuffling, one training thread, seeded generator; the
model bytes depend only on the corpus and the flags (no paths are stored in the model).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import pickle
import random
import string
import tempfile
import time
from typing import Iterable, Sequence

RESERVED = ("[SEG]", "[REGION]", *(f"[TASK_{i}]" for i in range(8)),
            *(f"<extra_id_{i}>" for i in range(16)))
INPUT_SENTENCE_SIZE = 2_000_000  # sentences read (in corpus order: no sampling below this)

# ---------------------------------------------------------------- built-in generic caption text

_SENTENCES = """\
A man riding a wave on top of a surfboard.
A woman is holding an umbrella in the rain.
Two dogs are playing with a frisbee in the park.
A cat sitting on the hood of a red car.
A group of people standing around a kitchen table.
A plate of food with broccoli, rice and chicken.
A large clock tower in the middle of a city.
A person on skis going down a snowy hill.
A little girl eating a slice of pizza.
An elephant walking through tall green grass.
A giraffe standing next to a tree in a zoo.
Three horses grazing in a field near a fence.
A bus parked on the side of the street.
A train traveling down the tracks past some trees.
An airplane flying over a city at sunset.
A boat floating on a calm lake under a blue sky.
A bowl of fruit with apples, bananas and oranges.
A laptop computer sitting on a wooden desk.
A man in a suit and tie talking on a phone.
A young boy swinging a baseball bat.
A tennis player hitting the ball with a racket.
A bedroom with a bed, a lamp and a small window.
A bathroom with a white sink, a toilet and a mirror.
A living room with a couch, a television and a rug.
A sheep standing in a field of grass.
A cow lying down on a dirt road.
A bird perched on a branch of a tree.
A teddy bear sitting on a chair.
A pizza with cheese and tomatoes on a table.
A man and a woman cutting a wedding cake.
People walking on a sidewalk next to tall buildings.
A red stop sign on the corner of a street.
A fire hydrant painted yellow and blue.
A motorcycle parked in front of a shop.
A bicycle leaning against a brick wall.
A skateboarder doing a trick on a ramp.
A kite flying high in the cloudy sky.
A zebra drinking water from a pond.
A bear walking across some rocks.
A vase full of flowers on a kitchen counter.
A sandwich cut in half on a white plate.
A cup of coffee next to a donut.
Two children sitting on a bench in the park.
An old man reading a newspaper on a train.
A woman riding a horse on the beach.
A truck driving on a highway in the desert.
A traffic light showing green at an intersection.
A pair of scissors lying on a piece of paper.
A toothbrush in a glass on the sink.
A refrigerator filled with bottles of milk and juice.
A microwave above the oven in a small kitchen.
A person holding a hot dog with mustard.
A dog wearing a collar lying on the floor.
A cat sleeping on a keyboard.
A mountain covered with snow behind a lake.
A river flowing under an old stone bridge.
The sun is setting behind the hills.
There is a car on the left and a tree on the right.
In the foreground there is a person holding a bag.
In the background we can see buildings, trees and the sky.
On the left side of the image there is a table with some objects.
On the right side we can see a window and a curtain.
At the top of the picture there is a cloudy sky.
At the bottom of the image there is a road.
In the center of the image a woman is standing and smiling.
In this picture I can see a boy wearing a cap.
This image is taken outdoors; the ground is covered with grass.
This picture is clicked inside a room.
We can see a few people sitting on chairs near a wall.
The man on the left is wearing a black jacket and blue jeans.
The woman on the right is holding a white cup.
The dog in front of the door is brown.
The tall tree behind the house has green leaves.
The small boat near the shore is white.
The person in the middle is wearing glasses.
Where is the man in the red shirt?
Which object is closest to the camera?
What can be used to cut the bread?
Find the animal that can climb trees.
Please segment the person who is holding the umbrella.
Can you segment the object used for drinking water in this image?
What is the thing that keeps people dry in the rain?
Sure, it is [SEG].
It is [SEG].
Sure, the segmentation result is [SEG].
The dog [SEG] is chasing the ball [SEG] on the grass [SEG].
A man [SEG] is sitting on a bench [SEG] next to a tree [SEG].
person, dog, car, tree, sky, grass, road, building, wall, floor.
left, right, top, bottom, middle, center, front, back, above, below, behind, between.
first, second, third, fourth, fifth, last, next, other, another, both, each, every.
zero one two three four five six seven eight nine ten eleven twelve twenty hundred thousand.
0 1 2 3 4 5 6 7 8 9 10 12 15 20 24 25 30 50 64 100 128 256 384 512 1000 2024.
It was 3:45 pm and 72 degrees; the bus number 42 arrived at 7.30 a.m.
The image is 640 x 480 pixels, and the box is at (12, 34) to (56, 78).
"Look!" she said. "Isn't it beautiful?" He replied: 'Yes, it's amazing.'
Mr. Smith's dog - a big, friendly one - ran across the road & into the woods...
A sign that says "OPEN 24/7" above the door, 50% off, #1 choice, $5 @ the shop.
"""

_WORDS = """\
a an the this that these those there here it its they them their he she his her we our you your i my
is are was were be been being has have had do does did can could will would should may might must
and or but not no yes so if then than because while when where which who whom whose what why how
of in on at by for with without from to into onto over under above below behind beside between
near next along across around through toward towards against inside outside up down off out away
left right top bottom middle center centre front back side corner edge part half end
one two three four five six seven eight nine ten many several few some all most more less other
person people man men woman women boy girl child children baby kid player rider skier surfer
dog dogs cat cats horse horses sheep cow cows elephant elephants bear bears zebra giraffe bird
birds animal animals fish duck chicken mouse
car cars truck bus train airplane plane boat bicycle bike motorcycle vehicle wheel wheels road
street sidewalk traffic light sign stop hydrant parking meter bench fence pole wire
tree trees grass bush plant plants flower flowers leaf leaves branch forest field garden park
sky cloud clouds sun moon star stars water sea ocean lake river beach sand snow rock rocks hill
mountain ground floor wall ceiling roof window windows door doors building buildings house room
table chair chairs couch sofa bed pillow blanket lamp desk shelf book books clock vase picture
kitchen bathroom bedroom oven sink toilet refrigerator microwave toaster cup glass bottle bowl
plate fork knife spoon food pizza cake sandwich banana apple orange broccoli carrot donut
laptop computer keyboard phone television screen remote mouse camera bag backpack umbrella
handbag suitcase tie hat cap shirt jacket coat dress shoes glasses helmet jeans
ball frisbee kite skateboard surfboard skis racket bat glove toy teddy scissors toothbrush
shape shapes circle circles square squares triangle triangles star rectangle diamond heart hexagon
oval line lines dot dots point points box boxes region object objects thing things
red orange yellow green blue purple violet pink brown black white grey gray silver gold dark
light pale bright colourful colorful colour color striped
big small large little tiny huge tall short long wide narrow thick thin round square flat
old young new open closed empty full clean dirty wet dry hot cold warm soft hard heavy light
near far close closest farthest nearest biggest smallest largest tallest shortest highest lowest
sitting standing walking running riding holding eating drinking playing looking wearing carrying
flying swimming jumping lying sleeping smiling talking reading cutting driving parked waiting
sit stand walk run ride hold eat drink play look wear carry fly swim jump lie sleep smile talk
image picture photo photograph view scene background foreground visible seen shown appears
segment segmentation mask find locate show point describe caption region object where which
"""

_ACCENTED = "àáâãäåçèéêëìíîïñòóôõöøùúûüýÿæœß"  # café, naïve, São Paulo: no <unk>
_SUBJECTS = ("a man", "a woman", "a boy", "a girl", "a dog", "a cat", "the person", "two people",
             "a small child", "an old man", "a young woman", "a brown horse", "a black bird",
             "three sheep", "a large elephant", "the red car", "a white truck", "a blue bus",
             "a green tree", "a yellow kite")
_ACTIONS = ("is standing", "is sitting", "is walking", "is running", "is lying", "is playing",
            "can be seen", "is parked", "is waiting", "is looking around")
_PLACES = ("on the left", "on the right", "in the middle", "at the top", "at the bottom",
           "next to the house", "near the water", "under the tree", "behind the fence",
           "in front of the building", "on the grass", "on the road", "in the kitchen",
           "by the window", "between two cars", "above the table", "below the bridge",
           "at the top left", "at the bottom right", "in the background")
_QUESTIONS = ("where is {}?", "which one is {}?", "find {} in the image.", "segment {}.",
              "an object of {}", "the region of {}", "please point to {}.")


def builtin_sentences(seed: int = 0) -> list[str]:
  """Generic English caption text written for this project: hand-written sentences, word lists,
  every printable ASCII character, and sentences drawn from templates with a fixed seed."""
  rng = random.Random(seed)
  lines = [s for s in _SENTENCES.splitlines() if s.strip()]
  lines += [w for row in _WORDS.splitlines() for w in row.split()]
  lines += [" ".join(string.ascii_letters), " ".join(string.digits), " ".join(string.punctuation),
            " ".join(_ACCENTED), " ".join(_ACCENTED.upper())]
  for _ in range(600):
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}."
    lines.append(sentence[0].upper() + sentence[1:])
  for subject in _SUBJECTS:
    for template in _QUESTIONS:
      lines.append(template.format(subject))
  return lines


# ---------------------------------------------------------------- the project's own text

def grounded_shapes_sentences(num_train: int = 300, seed: int = 0) -> list[str]:
  """Text of a grounded_shapes dataset with `num_train` scenes, generated in a temporary directory:
  LN captions and utterances, COCO captions, RefCOCO expressions, ReasonSeg queries (in that order,
  files in sorted order)."""
  from tfds_builders import grounded_shapes

  lines = []
  with tempfile.TemporaryDirectory() as tmp:
    grounded_shapes.generate(tmp, num_train=num_train, num_validation=0, num_test=0, seed=seed)
    with open(os.path.join(tmp, "grounded_shapes_train_localized_narratives.jsonl")) as f:
      for row in f:
        record = json.loads(row)
        lines.append(record["caption"])
        lines += [u["utterance"] for u in record["timed_caption"]]
    with open(os.path.join(tmp, "annotations", "captions_train.json")) as f:
      lines += [a["caption"] for a in json.load(f)["annotations"]]
    with open(os.path.join(tmp, "grounded_shapes", "refs(unc).p"), "rb") as f:
      refs = pickle.load(f, encoding="latin1")  # our own freshly generated file
    lines += [s["sent"] for ref in refs for s in ref["sentences"]]
    for path in sorted(glob.glob(os.path.join(tmp, "reasonseg", "train", "*.json"))):
      with open(path) as f:
        lines += list(json.load(f)["text"])
  return [s for s in lines if s.strip()]


def read_corpus(paths: Sequence[str]) -> list[str]:
  """Non-empty lines of the given text files, in order."""
  lines = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      lines += [s.rstrip("\n") for s in f if s.strip()]
  return lines


# ---------------------------------------------------------------- training

def train(sentences: Iterable[str], out_prefix: str, vocab_size: int = 2000, *,
          reserved: Sequence[str] = RESERVED, seed: int = 0) -> str:
  """Trains the unigram model on `sentences` and writes OUT.model and OUT.vocab; returns the
  .model path."""
  import sentencepiece as spm

  sentences = list(sentences)
  if not sentences:
    raise ValueError("empty corpus")
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, model_type="unigram",
      vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
      normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", user_defined_symbols=list(reserved),
      input_sentence_size=INPUT_SENTENCE_SIZE, shuffle_input_sentence=False, num_threads=1,
      minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  with open(out_prefix + ".model", "wb") as f:
    f.write(model.getvalue())
  processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
  with open(out_prefix + ".vocab", "w", encoding="utf-8") as f:
    for i in range(processor.get_piece_size()):
      f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")
  return out_prefix + ".model"


def main(argv: Sequence[str] | None = None) -> None:
  """Command line (module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output prefix: writes OUT.model and OUT.vocab")
  parser.add_argument("--vocab_size", type=int, default=2000, help="pieces wanted (a soft limit)")
  parser.add_argument("--corpus", nargs="*", default=None,
                      help="text files, one sentence per line (default: the project's own text)")
  parser.add_argument("--num_scenes", type=int, default=300, help="grounded_shapes scenes (default corpus)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  if args.corpus:
    sentences = read_corpus(args.corpus)
  else:
    sentences = grounded_shapes_sentences(args.num_scenes, args.seed) + builtin_sentences(args.seed)
  path = train(sentences, args.out, args.vocab_size, seed=args.seed)
  from pixelground.data.tokenizer import Tokenizer

  tok = Tokenizer(path)
  print(json.dumps({"model": path, "bytes": os.path.getsize(path), "sentences": len(sentences),
                    "pieces": tok.num_pieces, "vocab_size": tok.vocab_size,
                    "special_ids": tok.special_ids, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
  main()
