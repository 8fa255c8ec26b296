"""Helpers for tests and benchmarks (multi-process gloo harness, tiny models)."""
