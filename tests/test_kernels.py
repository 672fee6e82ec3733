"""Kernels behind the linear methods agree with plain PyTorch references."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from slimserve.loaders.schemes import sparse_rows
from slimserve.loaders.schemes.dictsparse import coef_to_dense, dense_to_coef
from slimserve.loaders.schemes.nm import nm_mask, pack_nm
from slimserve.plugin.kernels import bitmask, cpp, ell, nm
from slimserve.plugin.kernels import gemm as kernel_gemm
from slimserve.plugin.kernels import lowrank_sparse as lowrank_sparse_kernel
from slimserve.plugin.kernels.bitmask import BitmaskMatmul
from slimserve.plugin.kernels.ell import EllMatmul, _cpu_kernel
from slimserve.plugin.kernels.gemm import (
    ROWS_GEMM_FROM_TOKENS,
    STRIPS_BELOW_INPUTS,
    STRIPS_FROM_TOKENS,
    Bf16PanelsLinear,
    Bf16RowsLinear,
    bf16_panels_linear,
    factor_linear,
    from_panels,
    prepacked_linear,
    to_panels,
)
from slimserve.plugin.kernels.lowrank_sparse import LowRankSparsePanels
from slimserve.plugin.kernels.precision import stored_values
from slimserve.server.cpu_tuning import host_cpu_info


def test_each_variant_builds_with_its_own_isa(isa: str) -> None:
    for kernel in (_cpu_kernel(), bitmask._cpu_kernel()):
        assert kernel is not None and kernel.isa() == isa
    assert cpp.loop_isa() == isa  # what a caller may check before building a kernel it needs only on some ISAs


def test_the_same_source_in_a_new_environment_loads_the_cached_build_without_ninja(tmp_path: Path) -> None:
    """A fresh clone holds the same .cpp at another path, under another venv's torch headers: no rebuild.

    The child process forbids torch's ``load`` (the only way to reach ninja), so passing proves the
    cached library was imported by its key alone; it used to cost minutes per ISA per clone.
    """
    assert _cpu_kernel() is not None  # the build and its key exist (cached or built now)
    moved = tmp_path / "elsewhere" / "ell_cpu.cpp"
    moved.parent.mkdir()
    for shipped in (cpp.source_path("ell_cpu.cpp"), *cpp.source_path("ell_cpu.cpp").parent.glob("*.h")):
        (moved.parent / shipped.name).write_bytes(shipped.read_bytes())  # the clone's copy, headers beside it
    library = cpp.build_root() / "slimserve_ell_cpu" / "slimserve_ell_cpu.so"
    before = library.stat().st_mtime_ns
    script = ("import sys; from pathlib import Path; import torch.utils.cpp_extension as ext; "
              "from slimserve.plugin.kernels import cpp; "
              "ext.load = lambda *a, **k: sys.exit('load called: the cached build was not reused'); "
              "cpp.source_path = lambda source: Path(sys.argv[1]); "
              "assert cpp.build_cpu_extension('slimserve_ell_cpu', 'ell_cpu.cpp').isa() == cpp.supported_isas()[0]")
    result = subprocess.run([sys.executable, "-c", script, str(moved)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "loaded the cached build of CPU kernel ell_cpu.cpp" in result.stderr
    assert library.stat().st_mtime_ns == before


def test_changed_source_or_flags_change_the_key_and_a_mismatched_key_rebuilds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = b"int a;"
    key = cpp.build_key(source, list(cpp.CFLAGS))
    assert key != cpp.build_key(b"int b;", list(cpp.CFLAGS))
    assert key != cpp.build_key(source, [*cpp.CFLAGS, *cpp.ISA_FLAGS["avx2"]])
    # A stale key beside a library: torch's loader must be asked to build, and the new key recorded after.
    monkeypatch.setenv(cpp.BUILD_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(cpp, "source_path", lambda name: tmp_path / name)
    (tmp_path / "k.cpp").write_bytes(source)
    build_dir = cpp.build_root() / "slimserve_k"
    build_dir.mkdir(parents=True)
    (build_dir / "slimserve_k.so").write_bytes(b"not a library")
    (build_dir / "slimserve_k.key").write_text("stale")
    calls = []

    def fake_load(**kwargs: list[str]) -> object:
        calls.append(kwargs["sources"])
        # as torch's loader does: it appends its own flags (the venv's torch library path) to the lists it gets
        kwargs["extra_ldflags"].append("-L/some/venv/torch/lib")
        kwargs["extra_cflags"].append("-DTORCH_EXTENSION_NAME=slimserve_k")
        return types.SimpleNamespace(isa=lambda: "scalar")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    assert cpp.build_cpu_extension("slimserve_k", "k.cpp") is not None
    assert calls == [[str(tmp_path / "k.cpp")]]
    assert (build_dir / "slimserve_k.key").read_text() == key
    # what the loader appended stays out of later keys (it made every fresh clone's keys differ)
    assert cpp.build_key(source, list(cpp.CFLAGS)) == key


def test_a_header_beside_the_source_is_part_of_its_key(tmp_path: Path) -> None:
    """Kernels include shared headers (amx_strips.h); editing one must rebuild every kernel beside it."""
    (tmp_path / "k.cpp").write_bytes(b'#include "shared.h"')
    (tmp_path / "shared.h").write_bytes(b"int a;")
    before = cpp.source_bytes(tmp_path / "k.cpp")
    (tmp_path / "shared.h").write_bytes(b"int b;")
    assert cpp.source_bytes(tmp_path / "k.cpp") != before


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    assert not cpp.clear_stale_lock(tmp_path) and lock.exists()  # a build may be running now
    old = time.time() - cpp.STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    assert cpp.clear_stale_lock(tmp_path) and not lock.exists()
    assert not cpp.clear_stale_lock(tmp_path)  # nothing to remove


def test_an_unknown_or_unsupported_isa_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpp.ISA_ENV, "avx1024")
    with pytest.raises(cpp.KernelBuildError, match="avx1024"):
        _cpu_kernel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 37])  # one token (gather path); batched path with a partial 16-token chunk
@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int16, torch.int32])
# Nonzeros per row: 5 (below one AVX2 vector: tail only), 17 (AVX-512 masked tail of 1 after 16; AVX2 two
# gathers and a tail of 1), 27 (AVX2: one double step, one single 8-lane gather, a tail of 3; batched: an odd count).
@pytest.mark.parametrize("nnz", [5, 17, 27])
def test_ell_matmul_matches_dense_coefficients(dtype: torch.dtype, batch: int, index_dtype: torch.dtype, nnz: int,
                                               isa: str) -> None:
    torch.manual_seed(0)
    values, indices = dense_to_coef(torch.randn(96, 40), nnz)
    values, indices = values.to(dtype), indices.to(index_dtype)
    z = torch.randn(batch, 40, dtype=dtype)
    expected = z.float() @ coef_to_dense(values.float(), indices, 40).t()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    kernel = EllMatmul(values, indices, 40)
    assert kernel.ext is not None, "the compiled CPU kernel must build on this machine"
    out = kernel(z)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    assert out.is_contiguous()  # the next layer's oneDNN GEMM requires unit stride


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# one token (expand / permute path); AVX2's few-token rows at 2 and 3 (two byte chains), 5 and 8, its batch loop
# from 9; batched with a partial chunk
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 9, 37])
# (atoms, nnz): k = 5 (under one mask byte), odd k = 37 (3 spare bits; AVX-512: two 16-bit steps and a tail),
# k = 40 (whole bytes), k = 300 (groups of 8 mask bytes, single bytes after them), s = 1 and s = k; the last rows
# end at the values buffer's end; k = 1100: 8 tokens whose x is past an L1 (AVX2 row pairs: rows i and i + 33 of
# 67, an odd last row; with two threads ranges of 34 and 33) ending in a part byte, and long float32 sums;
# k = 4200: x past an L1 from 2 tokens.
@pytest.mark.parametrize(("atoms", "nnz"), [(5, 2), (37, 1), (37, 37), (40, 17), (300, 151), (1100, 433),
                                            (4200, 1805)])
def test_bitmask_matmul_matches_the_reference(dtype: torch.dtype, batch: int, atoms: int, nnz: int, isa: str) -> None:
    torch.manual_seed(0)
    values, mask = sparse_rows.dense_to_bitmask(torch.randn(67, atoms), nnz)
    values = values.to(dtype)
    z = torch.randn(batch, atoms, dtype=dtype)
    expected = sparse_rows.bitmask_product(z.double(), values.double(), mask)
    kernel = BitmaskMatmul(values, mask, atoms)
    assert kernel.ext is not None and kernel.ext.isa() == isa
    out = kernel.ext.bitmask_matmul(z, values, mask)  # the kernel itself (bf16 batches: on AMX if the CPU has it)
    tol = 1e-5 * max(1.0, nnz / 150) if dtype == torch.float32 else 5e-2  # float32 rounding grows with the sum's terms
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    assert out.dtype == dtype and out.is_contiguous()


#: Inputs of the strips tests: a row of 8200 weights is over 16 KiB even in bf16, so a strip (at most 4 MiB, at least
#: 256 rows) holds 256 rows and a weight of 300 rows takes a whole strip and a part.
STRIP_ATOMS = 8200


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int16, torch.int32])
def test_ell_many_tokens_by_expanded_strips_equal_the_reference(dtype: torch.dtype, index_dtype: torch.dtype,
                                                                isa: str) -> None:
    torch.manual_seed(0)
    # 256 atoms (uint8 indices reach no further): float32 strips of 4 MiB hold 4096 such rows, so 4100 rows are a
    # whole strip and a part
    values, indices = sparse_rows.dense_to_ell(torch.randn(4100, 256), 30)
    values, indices = values.to(dtype), indices.to(index_dtype)
    z = torch.randn(20, 256, dtype=dtype)
    kernel = EllMatmul(values, indices, 256)
    assert kernel.ext is not None and kernel.ext.isa() == isa
    out = kernel.ext.ell_matmul_strips(z, values, indices)
    assert out.dtype == torch.float32 and out.shape == (20, 4100) and out.is_contiguous()
    expected = z.double() @ coef_to_dense(values.double(), indices.long(), 256).t()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_many_tokens_by_decoded_strips_equal_the_reference(dtype: torch.dtype, isa: str) -> None:
    torch.manual_seed(0)
    # STRIP_ATOMS inputs: strips of 256 rows, so 300 rows are a whole strip and a part; weights scaled so that sums of
    # 3000 products stay about 1 in size, where float32 rounding stays under the tolerance below
    values, mask = sparse_rows.dense_to_bitmask(torch.randn(300, STRIP_ATOMS) / 64, 3000)
    values = values.to(dtype)
    z = torch.randn(20, STRIP_ATOMS, dtype=dtype)
    kernel = BitmaskMatmul(values, mask, STRIP_ATOMS)
    assert kernel.ext is not None and kernel.ext.isa() == isa
    out = kernel.ext.bitmask_matmul_strips(z, values, mask)
    # Native bf16 GEMMs (AVX512_BF16) keep bf16 strips, rounding the output to bf16; other builds compute in float32.
    bf16_strips = dtype == torch.bfloat16 and isa == "avx512" and "avx512_bf16" in host_cpu_info().flags
    assert out.dtype == (torch.bfloat16 if bf16_strips else torch.float32)
    assert out.shape == (20, 300) and out.is_contiguous()
    expected = sparse_rows.bitmask_product(z.double(), values.double(), mask)
    tolerance = dict(rtol=1e-2, atol=5e-2) if bf16_strips else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), expected, **tolerance)


def test_strips_of_a_weight_without_inputs_are_zeros(isa: str) -> None:
    """Strips are sized by a row's bytes; a row of none must not divide by zero, and y (allocated uninitialised)
    must still be written: every kernel that multiplies strips (bitmask, ELL, N:M, bf16 panels) shares the loop."""
    kernels = (bitmask._cpu_kernel(), ell._cpu_kernel(), nm._cpu_kernel(), kernel_gemm._bf16_panels_kernel())
    assert all(kernel is not None and kernel.isa() == isa for kernel in kernels)
    bitmask_ext, ell_ext, nm_ext, panels_ext = kernels
    no_bits, no_indices = torch.zeros(5, 0, dtype=torch.uint8), torch.zeros(5, 0, dtype=torch.int16)
    for dtype in (torch.float32, torch.bfloat16):
        x, no_values = torch.randn(20, 0, dtype=dtype), torch.zeros(5, 0, dtype=dtype)
        for out in (bitmask_ext.bitmask_matmul_strips(x, no_values, no_bits),
                    ell_ext.ell_matmul_strips(x, no_values, no_indices),
                    nm_ext.nm_matmul_strips(x, no_values, no_bits, 2, 4)):
            assert out.shape == (20, 5) and not out.any()
    out = panels_ext.bf16_panels_linear_strips(torch.randn(20, 0), to_panels(torch.zeros(5, 0).bfloat16()), 5)
    assert out.shape == (20, 5) and not out.any()


def test_bitmask_strips_take_the_leading_columns_of_wider_rows(isa: str) -> None:
    """Views of each row's first values and mask bytes (lowrank_sparse_folded's S, U stored after it) give the
    product of those rows alone; a row that is not contiguous is refused."""
    torch.manual_seed(0)
    values, mask = sparse_rows.dense_to_bitmask(torch.randn(300, STRIP_ATOMS) / 64, 3000)
    values = values.bfloat16()
    wide_values = torch.cat([values, torch.randn(300, 37).bfloat16()], dim=1)  # a U's values after S's
    wide_mask = torch.cat([mask, torch.randint(0, 256, (300, 5), dtype=torch.uint8)], dim=1)
    z = torch.randn(20, STRIP_ATOMS, dtype=torch.bfloat16)
    ext = BitmaskMatmul(values, mask, STRIP_ATOMS).ext
    assert ext is not None and ext.isa() == isa
    whole = ext.bitmask_matmul_strips(z, values, mask)
    torch.testing.assert_close(ext.bitmask_matmul_strips(z, wide_values[:, :3000], wide_mask[:, :STRIP_ATOMS // 8]),
                               whole, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="each row contiguous"):
        ext.bitmask_matmul_strips(z, wide_values[:, :6000:2], wide_mask[:, :STRIP_ATOMS // 8])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [17, 70, 96])  # a part panel of 48 alone, after a whole one, whole ones only
@pytest.mark.parametrize("encoding", ["ell-uint8", "ell-int16", "ell-int32", "bitmask"])
def test_many_tokens_on_the_stored_values_only_equal_the_reference(dtype: torch.dtype, tokens: int, encoding: str,
                                                                   isa: str) -> None:
    # 301 rows: two blocks of 128 and a part ending in an unpaired row; 151 values a row: three chunks of 64
    torch.manual_seed(tokens)
    z = torch.randn(tokens, 300, dtype=dtype)
    if encoding == "bitmask":
        values, mask = sparse_rows.dense_to_bitmask(torch.randn(301, 300), 151)
        values = values.to(dtype)
        ext = BitmaskMatmul(values, mask, 300).ext
        expected = sparse_rows.bitmask_product(z.double(), values.double(), mask)
        product = getattr(ext, "bitmask_matmul_kept", None)
        arguments = (values, mask)
    else:
        index_dtype = {"ell-uint8": torch.uint8, "ell-int16": torch.int16, "ell-int32": torch.int32}[encoding]
        atoms = 256 if index_dtype == torch.uint8 else 300
        values, indices = sparse_rows.dense_to_ell(torch.randn(301, atoms), 151)
        values, indices = values.to(dtype), indices.to(index_dtype)
        z = z[:, :atoms]
        ext = EllMatmul(values, indices, atoms).ext
        expected = z.double() @ coef_to_dense(values.double(), indices.long(), atoms).t()
        product = getattr(ext, "ell_matmul_kept", None)
        arguments = (values, indices)
    assert ext is not None and ext.isa() == isa
    if isa == "scalar":
        assert product is None  # the loop is AVX2 + FMA; scalar builds keep the strips
        return
    out = product(z, *arguments)
    assert out.dtype == torch.float32 and out.shape == (tokens, 301) and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile_unit", ["1", "0"])
# One token tile narrower than 16, a partial second, four (kept in tile registers), past DENSE_FROM_TOKENS
@pytest.mark.parametrize("batch", [1, 2, 17, 64, 300])
# 3 spans (less than one expanded chunk of 8); 1547: 49 spans, six whole chunks and one of 1, the last span partial
@pytest.mark.parametrize("atoms", [75, 1547])
def test_bf16_batches_equal_the_reference_on_and_off_the_amx_tile_unit(
        tile_unit: str, batch: int, atoms: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """On AMX hosts bf16 batches run on the tile unit (SLIMSERVE_AMX=0 keeps them on the vector loops)."""
    kernel = bitmask._cpu_kernel()
    if kernel is None or not kernel.amx_usable():
        pytest.skip("this CPU (or kernel build) has no AMX tile unit")
    monkeypatch.setenv("SLIMSERVE_AMX", tile_unit)
    assert kernel.amx_usable() == (tile_unit == "1")
    torch.manual_seed(0)
    values, mask = sparse_rows.dense_to_bitmask(torch.randn(37, atoms), atoms * 2 // 5)  # 37 rows: strips of 16
    values = values.to(torch.bfloat16)
    z = torch.randn(batch, atoms, dtype=torch.bfloat16)
    expected = sparse_rows.bitmask_product(z.double(), values.double(), mask)
    out = BitmaskMatmul(values, mask, atoms)(z)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("batch", [1, 2, 3, 8, 13, 29])  # one token (its own loop), a block of 4, blocks of 8
@pytest.mark.parametrize("atoms", [75, 1547])  # a partial last mask word; SmolLM2-sized k with unequal spans
def test_bf16_batches_on_the_dot_product_loop_equal_the_reference(batch: int, atoms: int) -> None:
    """On CPUs with AVX512_BF16 and VBMI2 bf16 batches dot expanded 32-atom spans; row 37 of 37 is a lone row."""
    kernel = bitmask._cpu_kernel()
    if kernel is None or not hasattr(kernel, "bitmask_matmul_dot"):
        pytest.skip("this CPU (or kernel build) has no AVX512_BF16 + VBMI2")
    torch.manual_seed(batch)
    values, mask = sparse_rows.dense_to_bitmask(torch.randn(37, atoms), atoms * 2 // 5)
    values = values.to(torch.bfloat16)
    z = torch.randn(batch, atoms, dtype=torch.bfloat16)
    expected = sparse_rows.bitmask_product(z.double(), values.double(), mask)
    torch.testing.assert_close(kernel.bitmask_matmul_dot(z, values, mask).double(), expected, rtol=1e-4, atol=1e-4)
    out = BitmaskMatmul(values, mask, atoms)(z)  # the op's road for this count
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=5e-2, atol=5e-2)


def test_many_token_calls_leave_the_batch_loop_and_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past their thresholds the ops leave the batch loop (AVX2: panels of stored values, strips on the tiled GEMM for
    denser C; else strips + ATen's GEMM), and every road gives the same product."""
    torch.manual_seed(0)
    values, indices = sparse_rows.dense_to_ell(torch.randn(64, 96), 40)
    _, mask = sparse_rows.ell_to_bitmask(values, indices, 96)
    z = torch.randn(20, 96)
    expected = sparse_rows.bitmask_product(z, values, mask)
    for module, kernel in ((bitmask, BitmaskMatmul(values, mask, 96)), (ell, EllMatmul(values, indices, 96))):
        roads = [kernel(z)]
        monkeypatch.setattr(module, "DENSE_FROM_TOKENS", 20)
        roads.append(kernel(z))
        if module is bitmask:
            monkeypatch.setattr(module, "PANELS_FROM_TOKENS", 20)
            roads.append(kernel(z))
            monkeypatch.setattr(module, "STORED_MAX_DENSITY", 0.0)  # AVX2: strips on the tiled GEMM
            roads.append(kernel(z))
        for out in roads:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tokens", "density", "entry"), [
    (16, 0.43, "bitmask_matmul"), (24, 0.43, "bitmask_matmul_kept"), (512, 0.5, "bitmask_matmul_kept"),
    (96, 0.6, "bitmask_matmul_strips"), (512, 0.64, "bitmask_matmul_strips")])
def test_avx2_many_token_roads_follow_the_measured_rule(tokens: int, density: float, entry: str,
                                                        kernel_entries) -> None:
    """AVX2 builds: the batch loop below 24 tokens, the panel loop from there, the strips for C more than half full."""
    if bitmask._cpu_kernel() is None or bitmask._cpu_kernel().isa() != "avx2":
        pytest.skip("the rule is for AVX2 builds (the native build here is not one)")
    called = kernel_entries(bitmask, "_cpu_kernel")
    torch.manual_seed(0)
    values, mask = sparse_rows.dense_to_bitmask(torch.randn(40, 200), int(density * 200))
    z = torch.randn(tokens, 200)
    out = torch.ops.slimserve.bitmask_matmul(z, values.contiguous(), mask)
    assert [name for name in called if name.startswith("bitmask_matmul")] == [entry]
    torch.testing.assert_close(out, sparse_rows.bitmask_product(z, values, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoding", ["bitmask", "ell"])
# the panels loop (6 tokens a pass and a part pass), and past STRIPS_FROM_TOKENS the tiled GEMM for the short factors
@pytest.mark.parametrize("tokens", [1, 7, 95, 130])
@pytest.mark.parametrize("outs", [[40], [64, 24, 24]])  # one U; three (a fused q/k/v), each on its slice of x Vᵀ
def test_lowrank_sparse_panels_equal_u_v_plus_s(encoding: str, tokens: int, outs: list[int], isa: str) -> None:
    _check_lowrank_sparse_panels(encoding, tokens, outs)


@pytest.mark.parametrize("tokens", [3, 130])
def test_lowrank_sparse_panels_without_a_compiler_compose_the_fallbacks(tokens: int,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel_gemm, "_bf16_panels_kernel", lambda: None)
    monkeypatch.setattr(lowrank_sparse_kernel, "_bf16_panels_kernel", lambda: None)
    _check_lowrank_sparse_panels("bitmask", tokens, [64, 24, 24])


def _check_lowrank_sparse_panels(encoding: str, tokens: int, outs: list[int]) -> None:
    torch.manual_seed(tokens)
    inn, ranks = 83, [9, 5, 7][:len(outs)]  # ranks off the 16-row panels; 83 inputs: no whole 8 at the end
    us = [torch.randn(out, rank).bfloat16() for out, rank in zip(outs, ranks)]
    v = torch.randn(sum(ranks), inn).bfloat16()
    sparse = torch.randn(sum(outs), inn)
    if encoding == "bitmask":
        values, mask = sparse_rows.dense_to_bitmask(sparse, 40)
        product = BitmaskMatmul(values, mask, inn)
        dense_s = sparse_rows.bitmask_to_dense(values, mask, inn)
    else:
        values, indices = sparse_rows.dense_to_ell(sparse, 20)
        product = EllMatmul(values, indices, inn)
        dense_s = coef_to_dense(values, indices, inn)
    layer = LowRankSparsePanels(Bf16PanelsLinear(v), [Bf16PanelsLinear(u) for u in us], product)
    x = torch.randn(tokens, inn)
    low_rank = torch.cat([(x.double() @ part.double().t()) @ u.double().t()
                          for u, part in zip(us, v.split(ranks))], dim=1)
    expected = low_rank + x.double() @ dense_s.double().t()
    out = layer(x)
    assert out.shape == (tokens, sum(outs)) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-3)


def test_lowrank_add_names_a_u_without_its_output_width(isa: str) -> None:
    ext = kernel_gemm._bf16_panels_kernel()
    assert ext is not None and ext.isa() == isa
    v, u = to_panels(torch.randn(4, 8).bfloat16()), to_panels(torch.randn(16, 4).bfloat16())
    with pytest.raises(RuntimeError, match="one output width per U"):
        ext.bf16_panels_lowrank_add(torch.randn(2, 8), v, [u, u], [16], torch.zeros(2, 32), 0)
    with pytest.raises(RuntimeError, match=r"panels must be \[ceil\(out / 16\), in, 16\] for in = 4 and out = 40"):
        ext.bf16_panels_lowrank_add(torch.randn(2, 8), v, [u], [40], torch.zeros(2, 40), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 48), (1024, 256)])
def test_prepacked_linear_matches_f_linear(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=dtype)
    x = torch.randn(7, shape[1], dtype=dtype)
    f = prepacked_linear(weight)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(f(x).float(), (x.float() @ weight.float().t()), rtol=tol, atol=tol * shape[1] ** 0.5)


def _product_and_tensors(encoding: str, atoms: int) -> tuple[object, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The product of an encoding (every road the operator takes), float32 values that bf16 holds exactly, and the
    rest of its arguments."""
    weight = torch.randn(96, atoms).bfloat16().float()
    if encoding == "bitmask":
        values, mask = sparse_rows.dense_to_bitmask(weight, atoms // 2 + 1)
        return bitmask.bitmask_matmul, values, (mask,)
    if encoding == "ell":
        values, indices = sparse_rows.dense_to_ell(weight, atoms // 2 + 1)
        return ell.ell_matmul, values, (indices.to(torch.int16),)
    packed = pack_nm(weight * nm_mask(weight, 2, 4), 2, 4)
    return (lambda x, values, positions: nm.nm_matmul(x, values, positions, 2, 4),
            packed["values"], (packed["positions"],))


# tokens: one (its own loop), a batch of 8 (one AVX2 register a value), 13 (a partial 16), 40 (AVX2 panels) and 200
# (panels on AVX2, strips of a decoded weight elsewhere)
@pytest.mark.parametrize("tokens", [1, 8, 13, 40, 200])
@pytest.mark.parametrize("encoding", ["bitmask", "ell", "nm-2:4"])
def test_bf16_values_under_float32_activations_give_the_float32_result_bit_for_bit(encoding: str, tokens: int,
                                                                                   isa: str) -> None:
    # A host serving float32 keeps a bf16 checkpoint's sparse values in bf16 (plugin/kernels/precision.py): every
    # road must widen them exactly and keep float32 sums, not round the output to the values' dtype.
    torch.manual_seed(tokens)
    product, values, rest = _product_and_tensors(encoding, 300)
    z = torch.randn(tokens, 300)
    as_float32 = product(z, values, *rest)
    as_bf16 = product(z, values.bfloat16(), *rest)
    assert as_bf16.dtype == torch.float32 and as_bf16.is_contiguous()
    assert torch.equal(as_bf16, as_float32)


# tokens: 1-3 (the panel loop's split accumulator sets), 5 (one part pass), 8 (a pass of 6, then 2), the step before
# and at STRIPS_FROM_TOKENS (short inputs take the tiled GEMM there: whole and part 6-token tiles); rows past whole
# 16-row panels and the 64-row units; inputs under STRIPS_BELOW_INPUTS (75) and over it (523: past the tiled GEMM's
# 256-input slices), and a SmolLM2-sized shape
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, STRIPS_FROM_TOKENS - 1, STRIPS_FROM_TOKENS])
@pytest.mark.parametrize(("out", "inp"), [(37, 75), (300, 523), (1536, 576)])
def test_a_bf16_kept_dense_weight_gives_the_float32_product(tokens: int, out: int, inp: int, isa: str) -> None:
    torch.manual_seed(tokens)
    weight = torch.randn(out, inp).bfloat16()
    x = torch.randn(tokens, inp)
    y = bf16_panels_linear(x, to_panels(weight), out)
    assert y.dtype == torch.float32 and y.shape == (tokens, out) and y.is_contiguous()
    torch.testing.assert_close(y.double(), x.double() @ weight.double().t(), rtol=1e-4, atol=1e-3)
    strips = kernel_gemm._bf16_panels_kernel().bf16_panels_linear_strips(x, to_panels(weight), out)
    torch.testing.assert_close(strips.double(), x.double() @ weight.double().t(), rtol=1e-4, atol=1e-3)


def test_only_short_bf16_panels_take_the_tiled_gemm_and_only_for_many_tokens(kernel_entries) -> None:
    called = kernel_entries(kernel_gemm, "_bf16_panels_kernel")
    for inp, tokens, entry in [(STRIPS_BELOW_INPUTS - 1, STRIPS_FROM_TOKENS, "bf16_panels_linear_strips"),
                               (STRIPS_BELOW_INPUTS - 1, STRIPS_FROM_TOKENS - 1, "bf16_panels_linear"),
                               (STRIPS_BELOW_INPUTS, STRIPS_FROM_TOKENS, "bf16_panels_linear")]:
        called.clear()
        weight = torch.randn(20, inp).bfloat16()
        x = torch.randn(tokens, inp)
        torch.testing.assert_close(bf16_panels_linear(x, to_panels(weight), 20), x @ weight.float().t(),
                                   rtol=1e-4, atol=1e-3)
        assert called == [entry], (inp, tokens)


def test_bf16_rows_equal_the_float_product_on_the_dot_loops_then_atens_gemm(isa: str, kernel_entries) -> None:
    """Plain bf16 rows (``Bf16RowsLinear``): one token, blocks of 4 and 8 tokens and a last span of 8 inputs on the
    dot loops, ``ROWS_GEMM_FROM_TOKENS`` and more on ATen's GEMM."""
    if not hasattr(kernel_gemm._bf16_panels_kernel(), "bf16_rows_linear"):
        pytest.skip(f"the {isa} build has no bf16 dot loops (AVX512_BF16 and VBMI2)")
    called = kernel_entries(kernel_gemm, "_bf16_panels_kernel")
    weight = torch.randn(300, 1000).bfloat16() / 16
    product = Bf16RowsLinear(weight)
    for tokens in (1, 2, 5, 8, 127, ROWS_GEMM_FROM_TOKENS, 300):
        called.clear()
        x = torch.randn(tokens, 1000).bfloat16()
        y = product(x)
        assert y.dtype == torch.bfloat16 and y.shape == (tokens, 300)
        torch.testing.assert_close(y.float(), x.float() @ weight.float().t(), rtol=8e-3, atol=1e-2)
        assert called == (["bf16_rows_linear"] if tokens < ROWS_GEMM_FROM_TOKENS else []), tokens


@pytest.mark.parametrize("ranks", [[13], [40, 9, 23]])
def test_a_low_rank_layer_in_one_call_equals_its_factors_one_call_each(isa: str, kernel_entries,
                                                                        ranks: list[int]) -> None:
    """``LowRankRows``: one shard or a fused layer's three (V stacked, each U on its slice of x Vᵀ) give, bit for bit,
    what V and each U as ``Bf16RowsLinear`` give, in one kernel call below ``ROWS_GEMM_FROM_TOKENS``, ATen's GEMMs
    from there."""
    if not hasattr(kernel_gemm._bf16_panels_kernel(), "bf16_rows_lowrank"):
        pytest.skip(f"the {isa} build has no bf16 dot loops (AVX512_BF16 and VBMI2)")
    generator = torch.Generator().manual_seed(5)
    us = [(torch.randn(out, rank, generator=generator) / 8).bfloat16() for out, rank in zip((70, 24, 33), ranks)]
    v = (torch.randn(sum(ranks), 200, generator=generator) / 8).bfloat16()
    called = kernel_entries(kernel_gemm, "_bf16_panels_kernel")
    _assert_one_call_equals_apart(kernel_gemm.LowRankRows(v, us), Bf16RowsLinear(v), [Bf16RowsLinear(u) for u in us],
                                  ranks, 200, torch.bfloat16, ROWS_TOKENS, "bf16_rows_lowrank", ROWS_GEMM_FROM_TOKENS,
                                  called, generator)


#: Token counts on both sides of the rows operators' crossover (bf16 serving) and of the panels' (float32 serving).
ROWS_TOKENS = (1, 2, 5, 8, 127, ROWS_GEMM_FROM_TOKENS, 300)
PANELS_TOKENS = (0, 1, 2, 5, 8, 13, 31, 32, STRIPS_FROM_TOKENS - 1, STRIPS_FROM_TOKENS, 300)


def _assert_one_call_equals_apart(layer: Callable[[torch.Tensor], torch.Tensor],
                                  first: Callable[[torch.Tensor], torch.Tensor],
                                  seconds: list[Callable[[torch.Tensor], torch.Tensor]], widths: list[int],
                                  in_features: int, dtype: torch.dtype, token_counts: tuple[int, ...], entry: str,
                                  few_tokens_below: int, called: list[str], generator: torch.Generator) -> None:
    """``layer(x)`` equals ``first`` and then each of ``seconds`` on its ``widths`` slice, bit for bit, for x of
    ``dtype`` at each of ``token_counts``, and enters the kernel through ``entry`` exactly below
    ``few_tokens_below`` tokens."""
    for tokens in token_counts:
        x = torch.randn(tokens, in_features, generator=generator).to(dtype)
        z = first(x)
        expected = torch.cat([second(part.contiguous()) for second, part in zip(seconds, z.split(widths, dim=1))], 1)
        called.clear()
        y = layer(x)
        assert (entry in called) == (tokens < few_tokens_below), tokens
        assert y.dtype == dtype and torch.equal(y, expected), tokens


def _panels_factor(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A float32 factor whose values bf16 holds exactly, as vLLM loads a bf16 checkpoint to serve it in float32."""
    return (torch.randn(rows, columns, generator=generator) / 8).bfloat16().float()


@pytest.mark.parametrize("in_features", [200, 600])
@pytest.mark.parametrize("ranks", [[13], [40, 9, 23]])
def test_a_float32_served_low_rank_layer_in_one_call_equals_its_factors_one_call_each(
        isa: str, kernel_entries, ranks: list[int], in_features: int) -> None:
    """``LowRankPanels`` (a bf16 checkpoint served in float32 on AVX2): one shard or a fused layer's three (V stacked,
    each U on its slice of x Vᵀ) give, bit for bit, what V and each U as ``Bf16PanelsLinear`` give, at every token
    count in one kernel call (V short enough for the tiled GEMM from ``STRIPS_FROM_TOKENS``, and V too long)."""
    generator = torch.Generator().manual_seed(9)
    us = [_panels_factor(out, rank, generator) for out, rank in zip((70, 24, 33), ranks)]
    v = _panels_factor(sum(ranks), in_features, generator)
    if not kernel_gemm.LowRankPanels.usable([v], us):
        pytest.skip(f"the {isa} build keeps float32 factors on oneDNN (no bf16 panels)")
    layer = kernel_gemm.LowRankPanels(v, us)
    called = kernel_entries(kernel_gemm, "_bf16_panels_kernel")
    seconds = [Bf16PanelsLinear(u.bfloat16()) for u in us]
    _assert_one_call_equals_apart(layer, Bf16PanelsLinear(v.bfloat16()), seconds, ranks, in_features, torch.float32,
                                  PANELS_TOKENS, "bf16_panels_lowrank", 10**9, called, generator)


@pytest.mark.parametrize("atoms", [[40], [40, 24, 33]])
def test_a_float32_served_dictsparse_layer_in_one_call_equals_its_factors_one_call_each(
        isa: str, kernel_entries, atoms: list[int]) -> None:
    """``DictionaryBitmaskPanels`` (float32 serving on AVX2): one shard or a fused layer's three (dictionaries stacked,
    each C a bitmask on its slice of x Dᵀ) give, bit for bit, what the stacked dictionary as ``Bf16PanelsLinear`` and
    each C as ``BitmaskMatmul`` give: C's few-token loops in one call for every shard below
    ``bitmask.PANELS_FROM_TOKENS``, ``bitmask_matmul``'s many-token roads shard by shard from there."""
    generator = torch.Generator().manual_seed(10)
    dictionary = _panels_factor(sum(atoms), 200, generator)
    if not bitmask.DictionaryBitmaskPanels.usable([dictionary]):
        pytest.skip(f"the {isa} build keeps float32 factors on oneDNN (no bf16 panels)")
    coefficients = []
    for out, k in zip((70, 24, 33), atoms):
        values, mask = sparse_rows.dense_to_bitmask(_panels_factor(out, k, generator), k // 3)
        coefficients.append(BitmaskMatmul(values, mask, k))
    layer = bitmask.DictionaryBitmaskPanels(dictionary, coefficients)
    called = kernel_entries(bitmask, "_cpu_kernel")
    _assert_one_call_equals_apart(layer, Bf16PanelsLinear(dictionary.bfloat16()), coefficients, atoms, 200,
                                  torch.float32, PANELS_TOKENS, "bitmask_matmul_shards", bitmask.PANELS_FROM_TOKENS,
                                  called, generator)


def test_float32_served_shards_run_as_one_call_where_their_factors_are_panels() -> None:
    """Low-rank and bitmask dictsparse shards of a bf16 checkpoint served in float32 become one ``LowRankPanels`` /
    ``DictionaryBitmaskPanels`` runner exactly where ``Bf16PanelsLinear`` takes their dense factors, holding copies
    of their own; float32 factors that bf16 does not hold keep the runners apart."""
    from slimserve.plugin.vllm.shards import DictSparseShard, LowRankShard, OneCallLayer

    generator = torch.Generator().manual_seed(11)
    low_rank = [{"u": _panels_factor(out, rank, generator), "v": _panels_factor(rank, 64, generator)}
                for out, rank in ((48, 8), (16, 4))]
    dictsparse, dictsparse_specs = [], []
    for out, k in ((48, 16), (16, 24)):
        values, mask = sparse_rows.dense_to_bitmask(_panels_factor(out, k, generator), k // 2)
        dictsparse.append({"dictionary": _panels_factor(k, 64, generator), "coef_values": values, "coef_mask": mask})
        dictsparse_specs.append({"scheme": "dictsparse", "atoms": k, "encoding": "bitmask"})
    panels = Bf16PanelsLinear.usable(low_rank[0]["v"])
    x = torch.randn(3, 64, generator=generator)
    for shards, specs, runner, one_call in (
            (low_rank, [{"scheme": "lowrank"}] * 2, LowRankShard.layer, kernel_gemm.LowRankPanels),
            (dictsparse, dictsparse_specs, DictSparseShard.layer, bitmask.DictionaryBitmaskPanels)):
        whole = runner(shards, specs)
        assert (isinstance(whole, OneCallLayer) and isinstance(whole.second, one_call)) == panels
        assert (whole is None) == (not panels)
        unheld = [{name: t + 1e-4 if t.is_floating_point() else t for name, t in shard.items()} for shard in shards]
        assert runner(unheld, specs) is None
        if whole is None:
            continue
        expected = whole.second(x)
        for t in shards:
            for tensor in t.values():
                tensor.zero_()
        assert whole.first_factor is None and whole.out_features == 64 and torch.equal(whole.second(x), expected)


def test_the_rows_operators_take_an_empty_batch() -> None:
    """A step of no tokens gets an empty output from each rows operator, not a read of token blocks never padded."""
    if not hasattr(bitmask._cpu_kernel(), "bitmask_matmul_dictionary"):
        pytest.skip("this host's build has no bf16 dot loops (AVX512_BF16 and VBMI2)")
    weight = torch.randn(40, 64).bfloat16()
    values, mask = sparse_rows.dense_to_bitmask(torch.randn(24, 40), 13)
    x = torch.empty(0, 64, dtype=torch.bfloat16)
    layers = {24: bitmask.DictionaryBitmaskRows(weight, [BitmaskMatmul(values.bfloat16(), mask, 40)]),
              40: Bf16RowsLinear(weight), 32: kernel_gemm.LowRankRows(weight, [torch.randn(32, 40).bfloat16()])}
    for out, layer in layers.items():
        y = layer(x)
        assert y.shape == (0, out) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("encoding", ["bitmask", "ell", "nm-2:4"])
def test_the_sparse_products_take_an_empty_batch(encoding: str, dtype: torch.dtype, isa: str) -> None:
    """A step of no tokens gets an empty output from every sparse product, not a read of a token block never given
    (the bitmask few-token loops read 8 tokens for any count past 7, zero included, and segfaulted)."""
    product, values, rest = _product_and_tensors(encoding, 64)
    y = product(torch.empty(0, 64, dtype=dtype), values.to(dtype), *rest)
    assert y.shape == (0, 96) and y.dtype == dtype


def test_low_rank_shards_run_as_one_call_where_every_factor_is_rows() -> None:
    """A fused low-rank layer's shards become one ``LowRankRows`` runner exactly where ``Bf16RowsLinear`` takes the
    factors; it owns its copies (the shards' tensors are views of load buffers freed after loading)."""
    from slimserve.plugin.vllm.shards import LowRankShard, OneCallLayer

    generator = torch.Generator().manual_seed(6)
    shards = [{"u": torch.randn(out, rank, generator=generator).bfloat16(),
               "v": torch.randn(rank, 64, generator=generator).bfloat16()} for out, rank in ((48, 8), (16, 4))]
    whole = LowRankShard.layer(shards, [{"scheme": "lowrank"}] * 2)
    rows = Bf16RowsLinear.usable(shards[0]["v"]) and hasattr(kernel_gemm._bf16_panels_kernel(), "bf16_rows_lowrank")
    assert (isinstance(whole, OneCallLayer) and isinstance(whole.second, kernel_gemm.LowRankRows)) == rows
    assert (whole is None) == (not rows)
    assert LowRankShard.layer([{k: torch.randn(t.shape, generator=generator) for k, t in shard.items()}
                               for shard in shards], [{}] * 2) is None
    if whole is None:
        return
    x = torch.randn(3, 64, generator=generator).bfloat16()
    expected = torch.cat([(x.float() @ t["v"].float().t()).bfloat16().float() @ t["u"].float().t() for t in shards], 1)
    for t in shards:
        for tensor in t.values():
            tensor.zero_()
    assert whole.first_factor is None and whole.out_features == 64
    torch.testing.assert_close(whole.second(x).float(), expected, rtol=8e-3, atol=5e-2)


@pytest.mark.parametrize("atoms", [[40], [40, 24, 33]])
def test_a_dictsparse_layer_in_one_call_equals_its_factors_one_call_each(isa: str, kernel_entries,
                                                                        atoms: list[int]) -> None:
    """``DictionaryBitmaskRows``: one shard or a fused layer's three (dictionaries stacked, each C a bitmask on its
    slice of x Dᵀ) give, bit for bit, what the stacked dictionary as ``Bf16RowsLinear`` and each C as
    ``BitmaskMatmul`` give, in one kernel call below the crossovers, ATen's GEMM and the strips from there."""
    if not hasattr(bitmask._cpu_kernel(), "bitmask_matmul_dictionary"):
        pytest.skip(f"the {isa} build has no bf16 dot loops (AVX512_BF16 and VBMI2)")
    if bitmask._cpu_kernel().amx_usable():
        pytest.skip("C's products apart take the tile unit here, the one call the dot loops (not built on AMX hosts)")
    generator = torch.Generator().manual_seed(7)
    coefficients = []
    for out, k in zip((70, 24, 33), atoms):
        values, mask = sparse_rows.dense_to_bitmask(torch.randn(out, k, generator=generator), k // 3)
        coefficients.append(BitmaskMatmul(values.bfloat16(), mask, k))
    dictionary = (torch.randn(sum(atoms), 200, generator=generator) / 8).bfloat16()
    called = kernel_entries(bitmask, "_cpu_kernel")
    _assert_one_call_equals_apart(bitmask.DictionaryBitmaskRows(dictionary, coefficients), Bf16RowsLinear(dictionary),
                                  coefficients, atoms, 200, torch.bfloat16, ROWS_TOKENS, "bitmask_matmul_dictionary",
                                  ROWS_GEMM_FROM_TOKENS, called, generator)


def test_dictsparse_shards_run_as_one_call_where_the_dictionary_is_rows() -> None:
    """Bitmask dictsparse shards become one ``DictionaryBitmaskRows`` runner exactly where ``Bf16RowsLinear`` takes
    the dictionary, owning its copies; ELL shards keep their own runners."""
    from slimserve.plugin.vllm.shards import DictSparseShard, OneCallLayer

    generator = torch.Generator().manual_seed(8)
    shards, specs = [], []
    for out, k in ((48, 16), (16, 24)):
        coef = torch.randn(out, k, generator=generator)
        values, mask = sparse_rows.dense_to_bitmask(coef, k // 2)
        shards.append({"dictionary": torch.randn(k, 64, generator=generator).bfloat16(),
                       "coef_values": values.bfloat16(), "coef_mask": mask})
        specs.append({"scheme": "dictsparse", "atoms": k, "encoding": "bitmask"})
    whole = DictSparseShard.layer(shards, specs)
    rows = Bf16RowsLinear.usable(shards[0]["dictionary"]) and hasattr(bitmask._cpu_kernel(),
                                                                       "bitmask_matmul_dictionary")
    assert (isinstance(whole, OneCallLayer) and isinstance(whole.second, bitmask.DictionaryBitmaskRows)) == rows
    assert (whole is None) == (not rows)
    assert DictSparseShard.layer(shards, [{**spec, "encoding": "ell"} for spec in specs]) is None
    if whole is None:
        return
    x = torch.randn(3, 64, generator=generator).bfloat16()
    expected = torch.cat([(x.float() @ t["dictionary"].float().t()).bfloat16().float()
                          @ sparse_rows.bitmask_to_dense(t["coef_values"], t["coef_mask"], spec["atoms"]).float().t()
                          for t, spec in zip(shards, specs)], 1)
    for t in shards:
        for tensor in t.values():
            tensor.zero_()
    assert whole.first_factor is None and whole.out_features == 64
    torch.testing.assert_close(whole.second(x).float(), expected, rtol=8e-3, atol=5e-2)


def test_factor_linear_keeps_bf16_factors_as_rows_only_where_dot_loops_run(isa: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain rows on AVX-512 builds of CPUs with AVX512_BF16 and VBMI2 and no AMX (oneDNN's bf16 GEMM runs on the
    tile unit there), a copy the caller's buffer may be freed after; vLLM's prepacked GEMM everywhere else."""
    flags = cpp.cpu_flags()
    expected = isa == "avx512" and {"avx512_bf16", "avx512_vbmi2"} <= flags and "amx_bf16" not in flags
    weight = torch.randn(40, 64).bfloat16()
    product = factor_linear(weight)
    assert isinstance(product, Bf16RowsLinear) == expected
    assert not isinstance(factor_linear(weight.float()), Bf16RowsLinear)
    x = torch.randn(3, 64).bfloat16()
    reference = x.float() @ weight.float().t()
    weight.zero_()
    torch.testing.assert_close(product(x).float(), reference, rtol=8e-3, atol=1e-2)
    monkeypatch.setattr(kernel_gemm, "cpu_has_amx_bf16", lambda: True)
    assert not isinstance(factor_linear(torch.randn(40, 64).bfloat16()), Bf16RowsLinear)


def test_bf16_panels_refuse_a_layout_that_is_not_the_weights(isa: str) -> None:
    panels = to_panels(torch.randn(37, 75).bfloat16())
    with pytest.raises(RuntimeError, match=r"panels must be \[ceil\(out / 16\), in, 16\]"):
        bf16_panels_linear(torch.randn(2, 75), panels, 60)  # 60 rows need 4 panels, not 3


def test_dense_factors_keep_bf16_only_where_exact_and_the_build_widens_them(isa: str) -> None:
    # A float32-served bf16 checkpoint's dense factors (low-rank U and V, a dictionary) stay bf16 on AVX2 builds;
    # a float32 checkpoint's, or any on other builds, take vLLM's float32 path.
    exact = torch.randn(48, 40).bfloat16().float()
    product = prepacked_linear(exact)
    assert isinstance(product, Bf16PanelsLinear) == (isa == "avx2")
    if isa == "avx2":
        kept = from_panels(product.panels, product.out_features)
        assert kept.dtype == torch.bfloat16 and torch.equal(kept.float(), exact)
    x = torch.randn(5, 40)
    torch.testing.assert_close(product(x), F.linear(x, exact), rtol=1e-5, atol=1e-5)
    assert not isinstance(prepacked_linear(exact + 2.0 ** -20), Bf16PanelsLinear)


def test_values_keep_the_checkpoint_precision_only_where_exact_and_the_build_widens_them(isa: str) -> None:
    exact = torch.randn(64, 32).bfloat16().float()
    narrowed = stored_values(exact, "avx2")
    assert narrowed.dtype == torch.bfloat16 and torch.equal(narrowed.float(), exact)
    assert stored_values(exact, "avx512") is exact and stored_values(exact, None) is exact
    float32_checkpoint = exact + 2.0 ** -20  # low mantissa bits set: a float32 checkpoint's values
    assert stored_values(float32_checkpoint, "avx2") is float32_checkpoint
    values, mask = sparse_rows.dense_to_bitmask(exact, 17)
    kernel = BitmaskMatmul(values, mask, 32)
    assert kernel.values.dtype == (torch.bfloat16 if isa == "avx2" else torch.float32)
    z = torch.randn(3, 32)
    torch.testing.assert_close(kernel(z).double(), sparse_rows.bitmask_product(z.double(), values.double(), mask),
                               rtol=1e-5, atol=1e-5)
