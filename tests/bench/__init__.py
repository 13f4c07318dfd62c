"""Benchmarks, run with `python -m tests.bench <name>` (never part of pytest).

Timings live here and in docs/performance.md, never in test assertions.
"""
