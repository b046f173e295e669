"""The kernels the static decoder's Gemma path adds, against their PyTorch references and float64 formulas, under
TRITON_INTERPRET=1 (conftest), fp32 and fp16, odd sizes: soft-capped decode attention (Gemma 2), the packed GeGLU
(tanh GELU) and the float32 tanh both use."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from conftest import assert_close
from lorakit.errors import LorakitError
from lorakit.kernels.decode_attention import decode_attention, decode_attention_reference
from lorakit.kernels.geglu import geglu_packed, geglu_reference
from lorakit.kernels.triton.tanh import tanh_f32

DTYPES = [torch.float32, torch.float16]


@triton.jit
def _tanh_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tanh_f32(tl.load(X + offs, mask=mask, other=0.0)), mask=mask)


def _softcapped_float64(q, k_cache, v_cache, lengths, scale, softcap):
    """One (row, head) at a time in float64, only the valid keys touched: softcap * tanh(s * scale / softcap)."""
    b, h, d = q.shape
    g = h // k_cache.shape[1]
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        for j in range(h if n else 0):
            k, v = k_cache[i, j // g, :n].double(), v_cache[i, j // g, :n].double()
            scores = torch.tanh((k @ q[i, j].double()) * scale / softcap) * softcap
            out[i, j] = torch.softmax(scores, dim=0) @ v
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_soft_capped_decode_attention_matches_reference_and_float64(dtype, splits, monkeypatch):
    """B=3, H=6 over Hkv=2 (GQA), head_dim 40, S_max 130 (splits of 64 keys), lengths 0, 1 and 130, NaN/inf past
    the lengths; q scaled up so that the cap (2.0) bends most scores, and the scores pass tanh's two branches."""
    from lorakit.kernels.triton import decode_attention as triton_da

    calls = []
    real = triton_da.flash_decode
    monkeypatch.setattr(triton_da, "flash_decode", lambda *a: calls.append(a[-1]) or real(*a))
    b, h, hkv, d, s, lens = 3, 6, 2, 40, 130, [0, 1, 130]
    q = (torch.randn(b, h, d) * 2).to(dtype)
    k, v = torch.randn(b, hkv, s, d).to(dtype), torch.randn(b, hkv, s, d).to(dtype)
    k[1, :, 1:], v[1, :, 1:] = float("nan"), float("inf")
    lengths = torch.tensor(lens, dtype=torch.int32)
    scale, cap = d ** -0.5, 2.0
    out = decode_attention(q, k, v, lengths, scale, splits=splits, softcap=cap)
    ref = decode_attention_reference(q, k, v, lengths, scale, softcap=cap)
    truth = _softcapped_float64(q, k, v, lengths, scale, cap)
    assert calls == [cap]  # the kernel ran, with the cap
    assert_close(out, ref)
    assert_close(out, truth, dtype)
    assert_close(ref, truth, dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    # the cap changes the result: without it the same inputs give something else
    plain = decode_attention(q, k, v, lengths, scale, splits=splits)
    assert (plain[2].float() - out[2].float()).abs().max() > 0.05


def test_soft_cap_with_cache_rows_and_a_bad_cap():
    """The prefill form (rows=: q rows read chosen cache rows) carries the cap too; a cap <= 0 is refused."""
    q = torch.randn(4, 4, 16) * 3
    k, v = torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    rows, lengths = torch.tensor([1, 0, 1, 5]), torch.tensor([3, 20, 7, 4], dtype=torch.int32)
    out = decode_attention(q, k, v, lengths, 0.25, rows=rows, softcap=1.0)
    assert_close(out, decode_attention_reference(q, k, v, lengths, 0.25, rows=rows, softcap=1.0))
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # row 5 is outside the cache
    for bad in (0.0, -1.0, "2"):
        with pytest.raises(LorakitError, match="softcap must be None or a positive number"):
            decode_attention(q, k, v, lengths, 0.25, rows=rows, softcap=bad)


def test_float32_tanh_is_accurate_on_both_branches():
    """tanh_f32 (Taylor series below 0.3, exp form above) within 2 ulps of float64 tanh, around 0 and the switch."""
    x = torch.cat([torch.linspace(-12, 12, 2001), torch.linspace(-0.31, 0.31, 997), torch.tensor([0.0, 1e-30, -1e-8,
                                                                                                 0.3, -0.3, 40.0])])
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    truth = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * truth.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((y.double() - truth).abs() <= 2 * ulp + 1e-45).all()
    assert y[x == 0].eq(0).all() and y[x == 40.0].eq(1).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_packed_matches_reference_on_a_strided_view(dtype, monkeypatch):
    from lorakit.kernels.triton import swiglu as triton_geglu

    calls = []
    real = triton_geglu.gated_packed_forward
    monkeypatch.setattr(triton_geglu, "gated_packed_forward", lambda *a: calls.append(a[2]) or real(*a))
    F = 1100  # not a multiple of the 1024 block
    wide = torch.randn(5, 2 * F + 7, dtype=dtype) * 3
    gate_up = wide[:, 3:3 + 2 * F]  # a view with a row stride wider than 2F
    with torch.no_grad():
        h = geglu_packed(gate_up)
    assert calls == [True] and h.shape == (5, F) and h.dtype == dtype
    gate, up = gate_up[:, :F].double(), gate_up[:, F:].double()
    formula = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3))) * up
    assert_close(h, formula, dtype)
    assert_close(h, geglu_reference(gate_up[:, :F], gate_up[:, F:]), dtype)
    assert_close(geglu_reference(gate, up), formula, torch.float64)  # the reference is the tanh formula


@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_packed_adds_a_delta_in_the_same_pass(dtype, monkeypatch):
    from lorakit.kernels.triton import swiglu as triton_geglu

    calls = []
    real = triton_geglu.gated_packed_forward
    monkeypatch.setattr(triton_geglu, "gated_packed_forward", lambda *a: calls.append(a[2]) or real(*a))
    F = 37
    gate_up = (torch.randn(3, 2 * F + 5) * 3).to(dtype)[:, 2:2 + 2 * F]
    delta = torch.randn(3, 2 * F + 2).to(dtype)[:, 1:1 + 2 * F]
    with torch.no_grad():
        h = geglu_packed(gate_up, delta)
    assert calls == [True]
    summed = gate_up + delta  # in dtype: the rounding the fused kernel reproduces
    assert_close(h, geglu_reference(summed[:, :F].double(), summed[:, F:].double()), dtype)
    assert not torch.equal(h, geglu_packed(gate_up))
    with pytest.raises(LorakitError, match="delta must have gate_up's shape"):
        geglu_packed(gate_up, delta[:, :-2])
    with pytest.raises(LorakitError, match=r"takes \(T, 2F\)"):
        geglu_packed(gate_up[:, :-1])


def test_geglu_packed_reference_path_without_triton(monkeypatch):
    """LORAKIT_DISABLE_TRITON=1: the reference, with the delta added (rounded to gate_up's dtype) first."""
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")
    gate_up, delta = torch.randn(4, 22), torch.randn(4, 22)
    summed = gate_up + delta
    assert torch.equal(geglu_packed(gate_up, delta), geglu_reference(summed[:, :11], summed[:, 11:]))
