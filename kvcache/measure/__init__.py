"""Measurements: quality against the fp16 cache, capacity in a memory budget, device memory."""
