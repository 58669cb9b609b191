"""Benchmarks: cachefs against msb 0.7.11, measured in the same run (``make bench``)."""
