"""The decode step's weight-streaming GEMM (Triton, interpreter on CPU) against torch.addmm / mm, and PDL's
switches (off on the CPU, scoped to the thread)."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import assert_close
from lorakit.kernels import _triton
from lorakit.kernels.rows_linear import rows_linear, rows_linear_reference
from lorakit.kernels.triton import rows_gemm as triton_rows_gemm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 24, 16), (5, 37, 300), (64, 130, 257)])  # K not a multiple of the chunk
@pytest.mark.parametrize("residual", [False, True])
def test_rows_linear_matches_addmm(dtype, M, N, K, residual, monkeypatch):
    calls = []
    real = triton_rows_gemm.rows_gemm
    monkeypatch.setattr(triton_rows_gemm, "rows_gemm", lambda *a: calls.append(1) or real(*a))
    wide = torch.randn(M, K + 3, dtype=dtype)
    x = wide[:, 1:K + 1]  # a row stride wider than K, as the decoder's views have
    weight = torch.randn(N, K, dtype=dtype) / K ** 0.5
    r = torch.randn(M, N, dtype=dtype) if residual else None
    y = rows_linear(x, weight, r)
    assert calls == [1] and y.shape == (M, N) and y.dtype == dtype
    expected = rows_linear_reference(x.double(), weight.double(), None if r is None else r.double())
    assert_close(y, expected, dtype)


def test_rows_linear_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    monkeypatch.setattr(triton_rows_gemm, "rows_gemm", lambda *a: pytest.fail("the kernel was called"))
    weight = torch.randn(8, 16)
    for x in (torch.randn(65, 16), torch.randn(3, 16, dtype=torch.float64), torch.randn(16, 3).t()):
        w = weight.to(x.dtype)
        assert_close(rows_linear(x, w), x @ w.t(), torch.float32)


def test_rows_gemm_config_matches_the_measured_tiles():
    # bench/results/skinny_gemm_probe_h200.json's best (block_n, block_k, warps, stages) on 132 SMs
    best = {(6144, 4096): (64, 128, 4, 4), (4096, 4096): (32, 256, 4, 4), (28672, 4096): (64, 128, 4, 3),
            (4096, 14336): (32, 256, 4, 4), (3072, 2048): (32, 256, 4, 4), (2048, 2048): (16, 256, 4, 4),
            (16384, 2048): (64, 128, 4, 3), (2048, 8192): (16, 256, 4, 4)}
    for (N, K), tiles in best.items():
        assert triton_rows_gemm.rows_gemm_config(N, K, 132, prefetch=False) == tiles
        assert triton_rows_gemm.rows_gemm_config(N, K, 132, prefetch=True)[3] == tiles[3] - 1


def test_pdl_is_off_on_the_cpu_and_scoped_to_its_thread():
    x = torch.zeros(2)
    assert not _triton.pdl_on(x)
    with _triton.programmatic_launches():
        assert not _triton.pdl_on(x)  # the interpreter / a CPU tensor never launches with PDL
        assert _triton._PDL_STATE.on
        seen = []
        thread = threading.Thread(target=lambda: seen.append(getattr(_triton._PDL_STATE, "on", False)))
        thread.start()
        thread.join()
        assert seen == [False]  # another thread (a server's other work) is not affected
        with _triton.programmatic_launches(False):
            assert not _triton._PDL_STATE.on
        assert _triton._PDL_STATE.on
    assert not _triton._PDL_STATE.on
    assert _triton.pdl_launch(True) == {"launch_pdl": True} and _triton.pdl_launch(False) == {}


def test_rows_gemm_takes_an_output_buffer_and_an_explicit_tile():
    """What the benchmarks use: a given out buffer (a strided view), a forced tile, PDL and the early read off."""
    x, weight = torch.randn(7, 300), torch.randn(40, 300) / 300 ** 0.5
    wide = torch.full((7, 45), float("nan"))
    out = wide[:, 2:42]
    y = triton_rows_gemm.rows_gemm(x, weight, out=out, config=(16, 128, 4, 2), pdl=False, prefetch=False)
    assert y is out and wide[:, :2].isnan().all() and wide[:, 42:].isnan().all()  # nothing written outside
    assert_close(y, x.double() @ weight.double().t(), torch.float32)
    early = triton_rows_gemm.rows_gemm(x, weight, config=(16, 128, 4, 2), pdl=False, prefetch=True)
    assert_close(early, y)  # the first chunk read before the (absent) wait: the same sums
