"""Inference and evaluation: cached decoding, the per-image Predictor, the benchmark evaluator, figures."""
