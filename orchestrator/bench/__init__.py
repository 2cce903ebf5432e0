"""Benchmarks: attention kernels and training steps, as JSON and a markdown table."""
