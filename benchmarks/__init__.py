"""Benchmarks of nmcompile, run by hand (``python -m benchmarks.step``); not part of the test suite."""
