"""Benchmarks that compare the stack with a reference implementation (see `hf_compare`)."""
