"""Benchmarks and the scripts behind the README's tables: run each from the repository root as ``python -m bench.NAME``.

``bench.common`` holds what they share (flags, timing, device memory, JSON, fixtures); ``bench/gpu_check.sh``
is the prepared run on a lent GPU.
"""
