"""Benchmark stages: one module per stage, each registering itself with @bench.harness.stage."""
