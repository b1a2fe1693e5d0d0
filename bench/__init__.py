"""Benchmarks: loopback only, bounded in time; run with `make bench`."""
