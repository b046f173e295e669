"""The static decoder's rope + KV store that expands the q/k/v LoRA itself: the Triton kernel (TRITON_INTERPRET=1)
against the stored-delta path and the reference, with NaN in the adapters' padding, mixed and zero ranks, rows
without an adapter or with an out-of-range slot, cache rows; and the split-level grouped shrink/expand it plugs
into, against the one-call grouped LoRA."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from lorakit.errors import LorakitError
from lorakit.kernels.decode_attention import rope_store_, rope_store_reference_
from lorakit.kernels.grouped_lora import (grouped_expand_, grouped_expand_reference_, grouped_lora_add_reference,
                                          grouped_shrink, grouped_shrink_reference)
from lorakit.kernels.triton import grouped_lora as tg

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Blocks smaller than the widths: several shrink splits, expand blocks straddling segments."""
    monkeypatch.setitem(tg.CONFIGS, "shrink", dict(tg.CONFIGS["shrink"], block_k=16))
    monkeypatch.setitem(tg.CONFIGS, "expand", dict(tg.CONFIGS["expand"], block_n=32, iters=1))


def nan_padded_stack(slots, in_features, splits, R, dtype, g, b_scale=1.0):
    """One group's stack: A (S, G*R, K), B (S, N, R), scaling, rank (S, G), ranks mixed R/3/0 per slot and segment,
    NaN in every padded row of A and column of B (never to be read)."""
    G, N = len(splits), sum(splits)
    rank = torch.tensor([[(R, 3, 0)[(s + j) % 3] for j in range(G)] for s in range(slots)], dtype=torch.int32)
    A = torch.full((slots, G * R, in_features), float("nan"))
    B = torch.full((slots, N, R), float("nan"))
    col = 0
    for j, n in enumerate(splits):
        for s in range(slots):
            r = int(rank[s, j])
            A[s, j * R:j * R + r] = torch.randn(r, in_features, generator=g) / in_features ** 0.5
            B[s, col:col + n, :r] = torch.randn(n, r, generator=g) * b_scale
        col += n
    return A.to(dtype), B.to(dtype), torch.rand(slots, G, generator=g) + 0.5, rank


def case(dtype, T=6, K=24, F_=200, R=8, slots=3, seed=0):
    """x (T, K) and a gate/up-shaped stack (two segments of F_ columns) with the slot table of the tests."""
    g = torch.Generator().manual_seed(seed)
    stack = nan_padded_stack(slots, K, [F_, F_], R, dtype, g, b_scale=0.5)
    x = torch.randn(T, K, generator=g).to(dtype)
    slot_of_row = torch.tensor([0, -1, 2, 1, 7, 0][:T], dtype=torch.int32)  # 7: outside the slots = no adapter
    return x, stack, slot_of_row


def in_range(slots, n=3):
    """The slot table with out-of-range slots as -1: the one-call reference refuses them, the kernels skip them."""
    return torch.where(slots < n, slots, -1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_shrink_and_expand_equal_the_one_call_grouped_lora(dtype):
    x, (A, B, scaling, rank), slots = case(dtype)
    F_ = B.shape[1] // 2
    part = grouped_shrink(x, A, rank, slots, 2, split_k=2)
    assert part.shape[0] == 2  # the Triton shrink split K into several planes
    y0 = torch.randn(x.shape[0], 2 * F_, dtype=dtype)
    got = grouped_expand_(y0.clone(), part, B, scaling, rank, slots, [F_, F_])
    ref = grouped_lora_add_reference(y0.clone(), x, A, B, scaling, rank, in_range(slots), [F_, F_])
    assert_close(got, ref)
    # the split-level references agree with the one-call reference too, and store mode zeroes adapter-less rows
    ref_part = grouped_shrink_reference(x, A, rank, slots, 2)
    assert_close(grouped_expand_reference_(y0.clone(), ref_part, B, scaling, rank, slots, [F_, F_]), ref)
    stored = grouped_expand_(torch.full_like(y0, float("nan")), part, B, scaling, rank, slots, [F_, F_], accumulate=False)
    assert torch.all(stored[1] == 0) and torch.all(stored[4] == 0)
    assert_close(stored, ref - y0.to(dtype), dtype=torch.float16)


def qkv_case(dtype, T=5, H=4, Hkv=2, D=16, R=4, slots=3, K=20, seed=3):
    """A fused q/k/v output (T, (H + 2 Hkv) D) with its LoRA: A, B, scaling, rank (mixed, NaN padding), the shrink's
    planes, rotary rows, positions (one inactive row) and caches."""
    g = torch.Generator().manual_seed(seed)
    A, B, scaling, rank = nan_padded_stack(slots, K, [H * D, Hkv * D, Hkv * D], R, dtype, g)
    x = torch.randn(T, K, generator=g).to(dtype)
    qkv = torch.randn(T, (H + 2 * Hkv) * D, generator=g).to(dtype)
    angles = torch.rand(T, D // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    positions = torch.tensor([3, 0, -1, 5, 2][:T])
    slot_of_row = torch.tensor([0, -1, 2, 1, 7][:T], dtype=torch.int32)
    cache = torch.randn(T, Hkv, 8, D, generator=g).to(dtype)
    return x, qkv, (A, B, scaling, rank), slot_of_row, cos, sin, positions, cache, (H, Hkv, D)


def heads(flat, H, Hkv, D):
    T = flat.shape[0]
    v = flat.view(T, H + 2 * Hkv, D)
    return v[:, :H], v[:, H:H + Hkv], v[:, H + Hkv:]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_rows", [False, True])
def test_rope_store_expanding_the_qkv_lora_equals_the_stored_delta_path(dtype, with_rows, monkeypatch):
    x, qkv, (A, B, scaling, rank), slots, cos, sin, positions, cache, (H, Hkv, D) = qkv_case(dtype)
    part = grouped_shrink(x, A, rank, slots, 3, split_k=2)
    rows = torch.tensor([4, 0, 1, 2, 3]) if with_rows else None
    # the fused kernel
    got_qkv, got_k, got_v = qkv.clone(), cache.clone(), cache.clone()
    q, k, v = heads(got_qkv, H, Hkv, D)
    rope_store_(q, k, v, cos, sin, positions, got_k, got_v, rows=rows, lora=(part, B, scaling, rank, slots))
    # the unfused path: the expand stores the delta (in qkv's dtype), the reference adds it and rotates
    delta = grouped_expand_(torch.empty_like(qkv), part, B, scaling, rank, slots, [H * D, Hkv * D, Hkv * D],
                            accumulate=False)
    ref_qkv, ref_k, ref_v = (qkv.float() + delta.float()).to(dtype), cache.clone(), cache.clone()
    q, k, v = heads(ref_qkv, H, Hkv, D)
    rope_store_reference_(q, k, v, cos, sin, positions, ref_k, ref_v, rows)
    assert_close(got_qkv[:, :H * D], ref_qkv[:, :H * D])  # q rotated in place, delta included
    assert_close(got_k, ref_k)
    assert_close(got_v, ref_v)
    assert torch.isfinite(got_k).all() and torch.isfinite(got_qkv[:, :H * D]).all()  # NaN padding never read
    # the LoRA mattered, and the reference path of the dispatcher (no Triton) agrees too
    plain_k = cache.clone()
    q, k, v = heads(qkv.clone(), H, Hkv, D)
    rope_store_reference_(q, k, v, cos, sin, positions, plain_k, cache.clone(), rows)
    assert not torch.allclose(plain_k, got_k)
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")
    slow_qkv, slow_k, slow_v = qkv.clone(), cache.clone(), cache.clone()
    q, k, v = heads(slow_qkv, H, Hkv, D)
    rope_store_(q, k, v, cos, sin, positions, slow_k, slow_v, rows=rows, lora=(part, B, scaling, rank, slots))
    assert_close(slow_k, got_k)
    assert_close(slow_qkv[:, :H * D], got_qkv[:, :H * D])


def test_rope_store_lora_mistakes_are_one_line_errors():
    x, qkv, (A, B, scaling, rank), slots, cos, sin, positions, cache, (H, Hkv, D) = qkv_case(torch.float32)
    part = grouped_shrink(x, A, rank, slots, 3)
    q, k, v = heads(qkv, H, Hkv, D)
    with pytest.raises(LorakitError, match="lora must be"):
        rope_store_(q, k, v, cos, sin, positions, cache.clone(), cache.clone(), lora=(part, B[:, :-1], scaling, rank, slots))
    with pytest.raises(LorakitError, match="not both"):
        rope_store_(q, k, v, cos, sin, positions, cache.clone(), cache.clone(), delta=(q, k, v),
                    lora=(part, B, scaling, rank, slots))
