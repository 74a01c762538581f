"""PyTorch re-statements of reference models, for parity tests and benchmarks (needs torch)."""
