"""Model parts (one file each) and the composed PixelLLM (+ LISA) model."""
