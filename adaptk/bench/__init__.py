"""Benchmark harness: exact replay (runner, report) and real decoding (reference)."""
