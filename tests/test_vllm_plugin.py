"""Real vLLM serves slimserve checkpoints through the plugin, token for token like the reference.

The reference is transformers on the checkpoint's densified export (``slimserve densify``):
the same weights the factors stand for, run by a different engine, in float32.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimserve.loaders.checkpoint import densify, open_checkpoint
from slimserve.loaders.compress.run import compress
from slimserve.loaders.converters import convert_rocket
from slimserve.plugin.vllm.heap import IdleTrim
from slimserve.testing.models import build_tiny_causal_lm
from slimserve.testing.nm import write_nm_checkpoint
from slimserve.testing.rocket_layout import write_rocket_sep
from slimserve.testing.vllm import hf_greedy, scheme_reference_greedy, vllm_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Return a new list of", "import json", "Create a logger with"]


@pytest.fixture(scope="module")
def mixed_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROCKET-converted Llama with dense, lowrank and dictsparse shards mixed inside qkv and gate_up."""
    tmp = tmp_path_factory.mktemp("mixed_llama")
    write_rocket_sep(tiny_llama, tmp / "sep", keep_dense={"model.layers.0.self_attn.k_proj"},
                     nnz_of={"model.layers.1.mlp.up_proj": 127})
    out = convert_rocket(tmp / "sep", tmp / "slim")
    schemes = {m: s["scheme"] for m, s in open_checkpoint(out).modules.items()}
    assert schemes["model.layers.0.self_attn.k_proj"] == "dense"
    assert schemes["model.layers.0.self_attn.q_proj"] == "dictsparse"
    assert schemes["model.layers.1.mlp.up_proj"] == "lowrank"
    assert schemes["model.layers.1.mlp.gate_proj"] == "dictsparse"
    # k = 128, s = 42: a 16-byte mask a row beats 42 uint8 indices, so the engine runs below serve the bitmask kernel
    assert {s.get("encoding") for s in open_checkpoint(out).modules.values() if s["scheme"] == "dictsparse"} == \
        {"bitmask"}
    return out


def test_lowrank_llama_matches_densified_reference(tiny_llama: Path, tmp_path: Path) -> None:
    ckpt = compress(tiny_llama, tmp_path / "svd", ratio=0.3, progress=False)
    reference = hf_greedy(densify(ckpt, tmp_path / "dense"), PROMPTS)
    assert vllm_greedy(ckpt, PROMPTS) == reference
    # the compressed model really differs from the original, so equality above is not vacuous
    assert hf_greedy(tiny_llama, PROMPTS) != reference


def test_mixed_schemes_qwen3_match_densified_reference(tiny_qwen3: Path, tmp_path: Path) -> None:
    write_rocket_sep(tiny_qwen3, tmp_path / "sep", keep_dense={"model.layers.1.self_attn.v_proj"})
    ckpt = convert_rocket(tmp_path / "sep", tmp_path / "slim")
    assert {s["scheme"] for s in open_checkpoint(ckpt).modules.values()} == {"dense", "dictsparse"}
    assert vllm_greedy(ckpt, PROMPTS) == hf_greedy(densify(ckpt, tmp_path / "dense"), PROMPTS)


def test_mixed_schemes_llama_tp1_and_tp2_match_reference(mixed_llama: Path, tmp_path: Path) -> None:
    reference = hf_greedy(densify(mixed_llama, tmp_path / "dense"), PROMPTS)
    assert vllm_greedy(mixed_llama, PROMPTS) == reference
    assert vllm_greedy(mixed_llama, PROMPTS, tp=2) == reference


def test_default_compiled_mode_matches_reference(mixed_llama: Path, tmp_path: Path) -> None:
    """vLLM's default on CPU (torch.compile + inductor, no --enforce-eager) traces the plugin's ops."""
    reference = hf_greedy(densify(mixed_llama, tmp_path / "dense"), PROMPTS)
    assert vllm_greedy(mixed_llama, PROMPTS, enforce_eager=False) == reference


def test_full_rank_reproduces_the_dense_model(tiny_llama: Path, tmp_path: Path) -> None:
    ckpt = compress(tiny_llama, tmp_path / "full", rank=10_000, progress=False)
    assert all(s["rank"] == min(s["in_features"], s["out_features"]) for s in open_checkpoint(ckpt).modules.values())
    assert vllm_greedy(ckpt, PROMPTS) == hf_greedy(tiny_llama, PROMPTS)


def test_missing_factor_is_named_when_vllm_loads(mixed_llama: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(mixed_llama, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.gate_proj.coef_mask"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(RuntimeError, match=r"tensor 'model.layers.1.mlp.gate_proj.coef_mask'.*missing"):
        vllm_greedy(broken, PROMPTS[:1])


_HEAP_PROBE = """
import ctypes, sys, threading, time
from pathlib import Path
import torch
from slimserve.plugin.vllm.heap import (IDLE_SECONDS, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, malloc_trim,
                                        return_freed_memory)
if malloc_trim() is None:
    raise SystemExit(3)
libc = ctypes.CDLL(None)
libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)  # blocks of 1 MiB come from the heap, as a layer's buffers do
libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # free() alone does not hand the heap's top back
if sys.argv[1] == "idle":  # a worker: register() armed the hook, the worker imports vLLM's model runner
    from slimserve.plugin import register
    register()
    import vllm.v1.worker.gpu_model_runner  # noqa: F401
    assert any(t.name == "slimserve-idle-trim" for t in threading.enumerate())
resident = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * 4096
blocks = [torch.ones(1 << 18) for _ in range(256)]  # 256 x 1 MiB, touched
kept = blocks[1::2]  # every other block stays live, so the freed ones are holes, not the heap's top
before = resident()
del blocks
freed = before - resident()
if sys.argv[1] == "load":
    return_freed_memory()  # what the loader calls after each layer
else:
    time.sleep(2 * IDLE_SECONDS + 1)  # nothing runs: the watcher trims
print(freed >> 20, (before - resident()) >> 20, len(kept))
"""


@pytest.mark.parametrize("when", ["load", "idle"])
def test_freed_heap_pages_go_back_to_the_os_after_a_layer_loads_and_when_idle(when: str) -> None:
    """Load buffers, and what serving steps free, stay resident inside glibc's heap until something trims it (the
    worker's RSS would not fall by the bytes a compressed checkpoint saves): the loader after each layer, and in
    worker processes a watcher once they go idle. Own processes: the malloc settings the probe needs last."""
    proc = subprocess.run([sys.executable, "-c", _HEAP_PROBE, when], capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip("not glibc: no malloc_trim")
    assert proc.returncode == 0, proc.stderr[-2000:]
    freed_mib, returned_mib, _ = (int(v) for v in proc.stdout.split()[-3:])
    assert freed_mib < 32 and returned_mib > 96, (freed_mib, returned_mib)


_LOADING_PROBE = """
import ctypes
import torch
from slimserve.plugin.vllm.heap import LoadingLayers
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    raise SystemExit(3)
libc.mallinfo2.restype = Info
mapped = lambda: libc.mallinfo2().hblks
big = torch.empty(4 << 20)  # 16 MiB, mapped; freed, it moves glibc's threshold up, as a load does
del big
def placed(count=1):
    before = mapped()
    blocks = [torch.empty(1 << 19) for _ in range(count)]  # 2 MiB each
    return mapped() - before
LoadingLayers.created(); LoadingLayers.created()
print(placed(3))  # while layers load: mapped
LoadingLayers.loaded()
print(LoadingLayers.pending, placed())  # one still loading: mapped
LoadingLayers.loaded()
print(placed())  # serving: heap
"""


def test_packed_copies_are_mapped_outside_the_heap_while_layers_load() -> None:
    """Blocks from 1 MiB are mapped from the first compressed layer's creation until the last has loaded, then
    glibc's serving thresholds apply (2 MiB from the heap again). Own process: mallopt settings last."""
    proc = subprocess.run([sys.executable, "-c", _LOADING_PROBE], capture_output=True, text=True, timeout=120)
    if proc.returncode == 3:
        pytest.skip("not glibc 2.33+: no mallinfo2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-4:] == ["3", "1", "1", "0"], proc.stdout  # without the rule: 0, 1, 0, 0


def test_idle_trim_trims_once_per_idle_spell() -> None:
    """The watcher's rule on a fake CPU clock: busy samples reset the spell; an idle spell of IDLE_SECONDS trims
    once; staying idle does not trim again; working and idling again does."""
    clock = [0.0]
    trims: list[float] = []
    watcher = IdleTrim(lambda: trims.append(clock[0]), cpu_seconds=lambda: clock[0], idle_seconds=2.0, period=0.5)

    def samples(count: int, cores: float) -> list[bool]:
        out = []
        for _ in range(count):
            clock[0] += cores * 0.5
            out.append(watcher.tick())
        return out

    assert samples(6, cores=2.0) == [False] * 6  # serving: two cores busy
    assert samples(5, cores=0.34) == [False, False, False, True, False]  # a polling worker is idle: trims at 2 s
    assert samples(10, cores=0.0) == [False] * 10
    assert samples(1, cores=1.0) == [False]  # one busy sample re-arms it
    assert samples(4, cores=0.0) == [False, False, False, True]
    assert len(trims) == 2


@pytest.mark.parametrize("scheme", ["nm", "dictsparse", "lowrank"])
def test_a_bf16_checkpoint_served_as_float32_gives_the_float32_reference_tokens(scheme: str, tmp_path: Path) -> None:
    """Served as float32 (what hosts without bf16 arithmetic get), a bf16 checkpoint's sparse values and dense factors
    stay bf16 on AVX2 builds (plugin/kernels/precision.py): N:M values, dictsparse coefficients (bitmask-encoded)
    and dictionaries, low-rank U and V."""
    dense = build_tiny_causal_lm(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    if scheme == "nm":
        slim = write_nm_checkpoint(dense, tmp_path / "slim", pattern_of={"model.layers.1.mlp.up_proj": (4, 8)})
    elif scheme == "lowrank":
        slim = compress(dense, tmp_path / "slim", ratio=0.3, progress=False)
    else:
        write_rocket_sep(dense, tmp_path / "sep", nnz_of={"model.layers.1.mlp.up_proj": 127})
        slim = convert_rocket(tmp_path / "sep", tmp_path / "slim")
    ckpt = open_checkpoint(slim)
    stored = [name for name in ckpt.tensors if name.endswith(("values", ".u", ".v"))]
    assert stored and all(ckpt.tensors[name].dtype == torch.bfloat16 for name in stored)
    # the reference runs each module's own forward in float32 (a bf16 densified export would round D·C to bf16)
    reference = scheme_reference_greedy(slim, PROMPTS)
    assert vllm_greedy(slim, PROMPTS, dtype="float32") == reference
    if scheme == "lowrank":  # vLLM's default CPU mode (torch.compile) traces the bf16 factors' operator too
        assert vllm_greedy(slim, PROMPTS, dtype="float32", enforce_eager=False) == reference


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["dictsparse", "lowrank"])
def test_a_bf16_checkpoint_served_in_bf16_gives_the_float32_references_logprobs(scheme: str, tmp_path: Path) -> None:
    """Served as bf16, compiled at TP 1 and eager at TP 2: every greedy token's log-probability within bf16's rounding
    of what the float32 densified export gives it after the same prefix. On hosts with the bf16 dot loops and no tile
    unit the dense factors (low-rank U and V, the dictionary) run as plain bf16 rows, each layer in one call
    (``LowRankRows``; ``DictionaryBitmaskRows``, this checkpoint's coefficients being bitmasks), elsewhere on vLLM's
    prepacked GEMM; the prompts' prefill steps take ATen's GEMM or the dot loops by their length."""
    from slimserve.testing.vllm import bf16_logprob_gaps

    dense = build_tiny_causal_lm(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    if scheme == "lowrank":
        slim = compress(dense, tmp_path / "slim", ratio=0.3, progress=False)
    else:
        write_rocket_sep(dense, tmp_path / "sep", nnz_of={"model.layers.1.mlp.up_proj": 127})
        slim = convert_rocket(tmp_path / "sep", tmp_path / "slim")
    exported = densify(slim, tmp_path / "dense")
    gaps = bf16_logprob_gaps(slim, exported, ["The quick brown fox", "import json"])
    assert max(gaps.values()) < 0.1, gaps
