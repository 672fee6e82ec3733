"""Kernels behind the linear methods: one function per operation, a CPU path and an optional CUDA path."""
