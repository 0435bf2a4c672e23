"""Benchmarks of mallowspo-fast: speed and memory against the reference path and peers."""
