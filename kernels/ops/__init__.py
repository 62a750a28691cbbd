"""Triton kernels and their autograd Functions, one op per module (see docs/kernels.md)."""
