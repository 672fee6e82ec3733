"""Building slimserve's C++ CPU kernels: compiled once per machine at first use, then cached.

``torch.utils.cpp_extension.load`` compiles into ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) and reuses the build while the source is unchanged. A machine
without a compiler gets ``None`` and one warning; callers then use their PyTorch fallback.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from types import ModuleType


@functools.cache
def load_cpu_extension(name: str, source: str) -> ModuleType | None:
    """The compiled extension ``name`` built from ``source`` (a file beside this module), or None."""
    from torch.utils.cpp_extension import load

    path = Path(__file__).with_name(source)
    try:
        return load(name=name, sources=[str(path)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as err:
        warnings.warn(f"slimserve: could not build the CPU kernel {path.name} ({err}); using the slower PyTorch "
                      "fallback. Install a C++ compiler (g++) and ninja to get the compiled kernel.",
                      RuntimeWarning, stacklevel=2)
        return None
