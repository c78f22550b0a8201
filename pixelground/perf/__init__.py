"""Performance accounting: analytic model FLOPs, FLOPs of compiled HLO, accelerator peak / memory tables."""
