"""Helpers for tests and benchmarks on one machine: a local rank launcher and the clean-up of
DeepSpeed's leaked shared memory."""
