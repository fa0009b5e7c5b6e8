"""Benchmarks: which method, at what cost (accuracy, communication, training speed)."""
