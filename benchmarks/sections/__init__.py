"""Benchmark sections, one module each; importing `benchmarks.run` registers them in order."""
