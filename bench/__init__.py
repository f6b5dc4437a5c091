"""Benchmarks against the limits (`python -m bench`, see bench/README.md).

Every target is a ratio against a baseline measured in the same run, because the
machine is shared and noisy: absolute times say little, ratios travel.
"""
