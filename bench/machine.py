"""The machine line every benchmark table carries: CPU model and ISA, threads, torch, load.

Numbers in bench/README.md only mean something beside the CPU they ran on (AVX-512 Xeons and
AVX2-only EPYCs take different kernel paths) and how busy it was, so every bench prints this.
"""

from __future__ import annotations

import os

import torch

from slimserve.server.cpu_tuning import host_cpu_info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    return host_cpu_info().model_name


def describe_machine() -> str:
    """CPU model, torch threads and version, the ISA torch's kernels use, and the load average now."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"ISA {torch.backends.cpu.get_cpu_capability()}, load average {load}")
