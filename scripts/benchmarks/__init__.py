"""Benchmark subcommands of scripts/benchmark.py, one module each."""
