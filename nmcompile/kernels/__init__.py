"""Triton N:M kernels (issue 5); the portable path lives in ``nmcompile.ops``."""
