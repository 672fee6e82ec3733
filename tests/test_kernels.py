"""Kernels behind the linear methods agree with plain PyTorch references."""

from __future__ import annotations

import pytest
import torch

from slimserve.loaders.schemes.dictsparse import coef_to_dense, dense_to_coef
from slimserve.plugin.kernels.ell import EllMatmul
from slimserve.plugin.kernels.gemm import prepacked_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 37])  # one token (gather path); batched path with a partial 16-token chunk
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_ell_matmul_matches_dense_coefficients(dtype: torch.dtype, batch: int, index_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    values, indices = dense_to_coef(torch.randn(96, 40), 17)  # 17 nonzeros: a masked tail of 1 after 16
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
@pytest.mark.parametrize("shape", [(64, 48), (1024, 256)])
def test_prepacked_linear_matches_f_linear(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=dtype)
    x = torch.randn(7, shape[1], dtype=dtype)
    f = prepacked_linear(weight)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(f(x).float(), (x.float() @ weight.float().t()), rtol=tol, atol=tol * shape[1] ** 0.5)
