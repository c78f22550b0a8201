"""Checkpoint readers/writers: lazy per-tensor access to HF and T5X checkpoints."""

from pixelground.checkpoints.sources import SafetensorsSource, TensorSource, TorchBinSource, open_source
from pixelground.checkpoints.t5x import (LegacyT5XSource, OrbaxT5XSource, open_t5x,
                                         save_t5x_checkpoint)

__all__ = [
    "LegacyT5XSource",
    "OrbaxT5XSource",
    "SafetensorsSource",
    "TensorSource",
    "TorchBinSource",
    "open_source",
    "open_t5x",
    "save_t5x_checkpoint",
]
