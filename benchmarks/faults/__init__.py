"""Fault benchmarks: a long transaction that holds back vacuum, and a soak run."""
