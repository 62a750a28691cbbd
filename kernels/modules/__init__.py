"""Drop-in ``nn.Module`` / optimizer wrappers over :mod:`kernels.ops`, one per op."""
