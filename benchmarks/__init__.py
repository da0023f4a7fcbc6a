"""obanpro's benchmark suite: `python -m benchmarks.compare` runs every scenario against the peers."""
