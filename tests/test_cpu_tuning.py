"""``slimserve serve`` tunes vLLM for the CPU: dtype by ISA, thread binding, preloads, KV-cache size.

The choices are tested on fake ``/proc/cpuinfo`` text for hosts this machine is not (AVX2-only
EPYC, a 32-core SMT Xeon); the real served process's memory map is checked in
tests/test_serve_vllm.py, where a vLLM server is started anyway.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.server.cli import build_parser
from slimserve.server.cpu_tuning import (
    choose_dtype,
    local_world_size,
    openmp_and_malloc_preloads,
    parse_cpuinfo,
    thread_binding,
    tune_vllm,
)
from slimserve.server.launch import vllm_command

EPYC_FLAGS = "fpu sse sse2 avx fma avx2 bmi2"
SAPPHIRE_RAPIDS_FLAGS = "fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 amx_tile amx_bf16 amx_int8"
ICELAKE_FLAGS = "fpu sse2 avx2 fma avx512f avx512bw avx512_vnni"  # AVX-512 without native bf16


def fake_cpuinfo(flags: str, cores: int, threads_per_core: int = 1, model: str = "Test CPU") -> str:
    """/proc/cpuinfo text in Linux's x86 layout: logical CPU i is core i % cores, SMT siblings numbered after."""
    blocks = []
    for cpu in range(cores * threads_per_core):
        blocks.append(f"processor\t: {cpu}\nmodel name\t: {model}\nphysical id\t: 0\n"
                      f"core id\t\t: {cpu % cores}\nflags\t\t: {flags}\n")
    return "\n".join(blocks)


@pytest.mark.parametrize(("flags", "dtype"), [(EPYC_FLAGS, "float32"), (ICELAKE_FLAGS, "float32"),
                                              (SAPPHIRE_RAPIDS_FLAGS, "bfloat16"), ("avx512f avx512_bf16", "bfloat16")])
def test_dtype_is_bf16_only_with_native_bf16(flags: str, dtype: str) -> None:
    chosen, why = choose_dtype(flags.split())
    assert chosen == dtype
    assert ("natively" in why) == (dtype == "bfloat16")


def test_two_core_host_gives_both_cores_to_the_worker() -> None:
    # vLLM's automatic binding put the worker on core 0 and reserved core 1 here
    info = parse_cpuinfo(fake_cpuinfo(EPYC_FLAGS, cores=2, model="AMD EPYC 7B13"))
    assert info.model_name == "AMD EPYC 7B13"
    assert thread_binding(info, 1)[:2] == ("0,1", 0)
    assert thread_binding(info, 2)[:2] == ("0|1", 0)


def test_big_smt_host_uses_one_thread_per_core_and_reserves_one() -> None:
    info = parse_cpuinfo(fake_cpuinfo(SAPPHIRE_RAPIDS_FLAGS, cores=32, threads_per_core=2))
    binding, reserved, why = thread_binding(info, 2)
    assert reserved == 1
    assert binding == ",".join(map(str, range(0, 15))) + "|" + ",".join(map(str, range(15, 31)))
    assert "one thread per physical core" in why
    # a small SMT host keeps the siblings: 2 cores x 2 threads for one worker
    assert thread_binding(parse_cpuinfo(fake_cpuinfo(EPYC_FLAGS, cores=2, threads_per_core=2)), 1)[:2] == ("0,1,2,3", 0)


def test_binding_keeps_to_the_allowed_cpus_and_shares_when_short() -> None:
    info = parse_cpuinfo(fake_cpuinfo(EPYC_FLAGS, cores=8), allowed={2, 3, 4, 5})
    assert thread_binding(info, 2)[0] == "2,3|4,5"
    assert thread_binding(info, 3)[0] == "2|3|4,5"
    one = parse_cpuinfo(fake_cpuinfo(EPYC_FLAGS, cores=1))
    assert thread_binding(one, 2)[0] == "0|0"


def test_local_world_size_from_vllm_flags() -> None:
    assert local_world_size([]) == 1
    assert local_world_size(["--tensor-parallel-size", "2", "--pipeline-parallel-size=2"]) == 4
    assert local_world_size(["-tp", "2", "-pp", "2", "--nnodes", "2"]) == 2


PRELOADS = ["/v/lib/libiomp5.so", "/usr/lib/libtcmalloc.so.4"]


def test_tune_respects_what_the_user_set() -> None:
    info = parse_cpuinfo(fake_cpuinfo(EPYC_FLAGS, cores=2))
    env: dict[str, str] = {}
    args, log = tune_vllm(["--tensor-parallel-size", "2"], env, info, PRELOADS)
    assert args == ["--dtype", "float32"]
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "LD_PRELOAD": "/v/lib/libiomp5.so:/usr/lib/libtcmalloc.so.4"}
    assert any(line.startswith("dtype: float32") for line in log)

    env = {"VLLM_CPU_OMP_THREADS_BIND": "1", "LD_PRELOAD": "/other/libiomp5.so"}
    args, log = tune_vllm(["--dtype", "bfloat16"], env, info, PRELOADS)
    assert args == []
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "1", "LD_PRELOAD": "/usr/lib/libtcmalloc.so.4:/other/libiomp5.so"}

    # an OpenMP runtime already preloaded (vLLM's import adds torch's libgomp) is not joined by a second one
    env = {"LD_PRELOAD": "/t/torch.libs/libgomp-a34b3233.so.1"}
    tune_vllm([], env, info, PRELOADS)
    assert env["LD_PRELOAD"] == "/usr/lib/libtcmalloc.so.4:/t/torch.libs/libgomp-a34b3233.so.1"

    numa = parse_cpuinfo(fake_cpuinfo(SAPPHIRE_RAPIDS_FLAGS, cores=8), numa_nodes=2)
    env = {}
    assert tune_vllm([], env, numa, [])[0] == ["--dtype", "bfloat16"]
    assert env == {}  # vLLM's own binding is NUMA-aware


def test_preloads_found_in_the_environment_and_system(tmp_path: Path) -> None:
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    (tmp_path / "venv" / "lib" / "libiomp5.so").write_bytes(b"")
    (tmp_path / "sys").mkdir()
    (tmp_path / "sys" / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert openmp_and_malloc_preloads(str(tmp_path / "venv"), [str(tmp_path / "sys")]) == [
        str(tmp_path / "venv" / "lib" / "libiomp5.so"), str(tmp_path / "sys" / "libtcmalloc_minimal.so.4")]
    assert openmp_and_malloc_preloads(str(tmp_path / "none"), [str(tmp_path / "none")]) == []


def test_vllm_command_applies_tuning_and_kv_cache_flag(tiny_llama: Path) -> None:
    info = parse_cpuinfo(fake_cpuinfo(SAPPHIRE_RAPIDS_FLAGS, cores=2))
    lines: list[str] = []
    argv, env = vllm_command(tiny_llama, served_model_name="t", extra_args=["--max-model-len", "256"],
                             environ={"VLLM_CPU_KVCACHE_SPACE": "9"}, kv_cache_gib=2, cpu=info,
                             preloads=["/v/lib/libiomp5.so"], log=lines.append)
    assert argv[-4:] == ["--dtype", "bfloat16", "--max-model-len", "256"]  # the user's flags come last
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["LD_PRELOAD"] == "/v/lib/libiomp5.so"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert len(lines) == 4 and lines[0] == "CPU: Test CPU"


def test_serve_flags_parse() -> None:
    args = build_parser().parse_args(["serve", "--kv-cache-gib", "3", "--no-cpu-tuning", "model"])
    assert (args.kv_cache_gib, args.tune_cpu) == (3, False)
    assert build_parser().parse_args(["serve", "model"]).tune_cpu is None
