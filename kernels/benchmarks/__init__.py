"""Benchmarks of the kernels against torch eager and torch.compile: ``python -m kernels.benchmarks``."""
