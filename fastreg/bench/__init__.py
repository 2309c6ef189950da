"""Benchmarks of fastreg ops: `python -m fastreg.bench --help`."""
