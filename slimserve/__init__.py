"""slimserve: serve compressed and sparse models with vLLM and diffusers.

The package is split into four rooms, each a top-level folder of the repository
(see ``pyproject.toml`` and ``../shared/ARCHITECTURE.md``):

- ``slimserve.loaders``: what a compressed checkpoint is (format, read/write/validate,
  converters, compressor). Plain PyTorch, no engine imports.
- ``slimserve.plugin``: how engines run it (vLLM general plugin, diffusers hooks).
- ``slimserve.attention``: sparse attention math and kernels.
- ``slimserve.server``: how users reach it (CLI, FastAPI app, engines, metrics).
"""

__version__ = "0.1.0"
