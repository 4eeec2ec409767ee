"""Benchmarks: each bench_<name>.py measures one goal as a ratio, side by side, in one run.

`make bench` (``python -m bench``) runs them all and rewrites docs/benchmarks.md.
"""
