"""slimserve: serve compressed and sparse models with vLLM and diffusers.

This package is the hall: what every room shares. ``slimserve.errors`` (the typed error base
naming file, tensor, field and what was expected), ``slimserve.metrics`` (every Prometheus
family, defined once) and ``slimserve.testing`` (tiny models and live servers for tests and
benchmarks; shipped code never imports it). The rooms are top-level folders of the
repository mapped into this package (``pyproject.toml``; drawn in ``docs/ARCHITECTURE.md``):

- ``slimserve.loaders``: what a compressed checkpoint is (format, read/write/validate,
  schemes with their reference forward, converters, compressor, eval). Plain PyTorch.
- ``slimserve.plugin``: how engines run it (the vLLM general plugin, CPU kernels, diffusers
  processors). The only room that imports vLLM.
- ``slimserve.attention``: sparse attention as math and kernels (Sparse-vDiT). Plain PyTorch.
- ``slimserve.server``: how users reach it (CLI, launcher, FastAPI app, engines).
"""

__version__ = "0.1.0"
