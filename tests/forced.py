"""Decoding with forced tokens, for tests that need a random-weight model to write given tokens (a
`[SEG]` at a known step, an EOS at a known length)."""

import jax.numpy as jnp

from pixelground.models import t5 as t5_lib


def force_tokens(monkeypatch, forced: dict[int, int]):
  """Patches T5.decode_step so that decoder position i generates token forced[i] (a large logit
  bonus) and every forced token is generated nowhere else. Only programs traced after the patch see it
  (use a fresh Predictor: its programs trace anew)."""
  original = t5_lib.T5.decode_step

  def step(self, cache, tokens, index):
    logits, hidden, cache = original(self, cache, tokens, index)
    bonus = jnp.zeros(logits.shape[-1], logits.dtype)
    for tok in set(forced.values()):
      here = jnp.any(jnp.asarray([index == i for i, t in forced.items() if t == tok]))
      bonus = bonus.at[tok].add(jnp.where(here, 1e4, -1e4))
    return logits + bonus[None], hidden, cache

  monkeypatch.setattr(t5_lib.T5, "decode_step", step)
