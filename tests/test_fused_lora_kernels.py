"""The static decoder's kernels that expand a LoRA themselves: the decode-MLP middle (gate/up LoRA expand + SwiGLU
+ down LoRA shrink) and rope + KV store with the q/k/v expand. The Triton kernels (TRITON_INTERPRET=1) against
the references, the unfused path and an independent float64 formula, on awkward widths with NaN in the adapters'
padding, mixed and zero ranks, rows without an adapter or with an out-of-range slot; and the split-level grouped
shrink/expand they plug into, against the one-call grouped LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from lorakit.errors import LorakitError
from lorakit.kernels.decode_attention import rope_store_, rope_store_reference_
from lorakit.kernels.grouped_lora import (grouped_expand_, grouped_expand_reference_, grouped_lora_add_reference,
                                          grouped_shrink, grouped_shrink_reference)
from lorakit.kernels.swiglu_lora import swiglu_lora, swiglu_lora_reference
from lorakit.kernels.triton import grouped_lora as tg
from lorakit.kernels.triton import swiglu_lora as tsl

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Blocks smaller than the widths: several down planes, the last one partly past F; several shrink splits."""
    monkeypatch.setitem(tsl.CONFIG, "block", 32)
    monkeypatch.setitem(tg.CONFIGS, "shrink", dict(tg.CONFIGS["shrink"], block_k=16))
    monkeypatch.setitem(tg.CONFIGS, "expand", dict(tg.CONFIGS["expand"], block_n=32, iters=1))


def stacks(slots, K, F_, R, dtype, seed=0):
    """gate/up stack (A (S, 2R, K), B (S, 2F, R), scaling, rank (S, 2)) and down stack (A (S, R, F), B (S, K, R),
    scaling, rank (S, 1)), ranks mixed 0/3/R per slot and segment, NaN in every padded row and column."""
    g = torch.Generator().manual_seed(seed)
    choices = (R, 3, 0)

    def stack(splits, in_features):
        G, N = len(splits), sum(splits)
        rank = torch.tensor([[choices[(s + j) % 3] for j in range(G)] for s in range(slots)], dtype=torch.int32)
        A = torch.full((slots, G * R, in_features), float("nan"))
        B = torch.full((slots, N, R), float("nan"))
        col = 0
        for j, n in enumerate(splits):
            for s in range(slots):
                r = int(rank[s, j])
                A[s, j * R:j * R + r] = torch.randn(r, in_features, generator=g) / in_features ** 0.5
                B[s, col:col + n, :r] = torch.randn(n, r, generator=g) * 0.5
            col += n
        return A.to(dtype), B.to(dtype), torch.rand(slots, G, generator=g) + 0.5, rank

    return stack([F_, F_], K), stack([K], F_)


def case(dtype, T=6, K=24, F_=200, R=8, slots=3, seed=0):
    gu_stack, d_stack = stacks(slots, K, F_, R, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, K, generator=g).to(dtype)
    gate_up = torch.randn(T, 2 * F_, generator=g).to(dtype)
    slot_of_row = torch.tensor([0, -1, 2, 1, 7, 0][:T], dtype=torch.int32)  # 7: outside the slots = no adapter
    return x, gate_up, gu_stack, d_stack, slot_of_row


def in_range(slots, n=3):
    """The slot table with out-of-range slots as -1: the one-call reference refuses them, the kernels skip them."""
    return torch.where(slots < n, slots, -1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_shrink_and_expand_equal_the_one_call_grouped_lora(dtype):
    x, _, (A, B, scaling, rank), _, slots = case(dtype)
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


def float64_truth(gate_up, x, gu_stack, d_stack, slots):
    """act and the down shrink in float64, row by row, written apart from the reference (no rounding steps)."""
    A, B, scaling, rank = gu_stack
    A_d, _, _, rank_d = d_stack
    R, F_ = B.shape[2], B.shape[1] // 2
    gu = gate_up.double().clone()
    lows = torch.zeros(gate_up.shape[0], A_d.shape[1], dtype=torch.float64)
    act = torch.empty(gate_up.shape[0], F_, dtype=torch.float64)
    for t, s in enumerate(slots.tolist()):
        live = 0 <= s < A.shape[0]
        if live:
            for j in range(2):
                r = int(rank[s, j])
                if r:
                    low = A[s, j * R:j * R + r].double() @ x[t].double()
                    gu[t, j * F_:(j + 1) * F_] += scaling[s, j].double() * (B[s, j * F_:(j + 1) * F_, :r].double() @ low)
        act[t] = F.silu(gu[t, :F_]) * gu[t, F_:]
        if live and int(rank_d[s, 0]):
            r = int(rank_d[s, 0])
            lows[t, :r] = A_d[s, :r].double() @ act[t]
    return act, lows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("F_", [200, 32, 7])
def test_fused_kernel_equals_reference_and_float64(dtype, F_):
    x, gate_up, gu_stack, d_stack, slots = case(dtype, F_=F_)
    A, B, scaling, rank = gu_stack
    A_d, _, _, rank_d = d_stack
    part_gu = grouped_shrink(x, A, rank, slots, 2, split_k=2)  # the fused kernel adds both planes
    act, part_d = swiglu_lora(gate_up, part_gu, B, scaling, rank, A_d, rank_d, slots)
    ref_act, ref_part = swiglu_lora_reference(gate_up, part_gu, B, scaling, rank, A_d, rank_d, slots)
    assert act.dtype == dtype and part_d.dtype == torch.float32
    assert part_d.shape[0] == -(-F_ // min(32, max(16, 1 << (F_ - 1).bit_length())))  # one plane per column block
    assert_close(act, ref_act)
    live = torch.tensor([0, 2, 3, 5])  # rows with a slot in range; the others' planes are never read
    assert_close(part_d.sum(0)[live], ref_part.sum(0)[live], dtype=torch.float16 if dtype == torch.float16 else None)
    assert torch.isfinite(act).all()
    truth_act, truth_low = float64_truth(gate_up, x, gu_stack, d_stack, slots)
    assert_close(act.double(), truth_act, dtype=dtype)
    assert_close(part_d.sum(0)[live].double(), truth_low[live], dtype=dtype)
    # rows without an adapter get the plain SwiGLU
    plain = (F.silu(gate_up[[1, 4]].float()[:, :F_]) * gate_up[[1, 4]].float()[:, F_:]).to(dtype)
    assert_close(act[[1, 4]], plain)


def test_down_expand_from_fused_planes_equals_unfused_down_lora():
    dtype = torch.float32
    x, gate_up, gu_stack, d_stack, slots = case(dtype)
    A, B, scaling, rank = gu_stack
    A_d, B_d, scaling_d, rank_d = d_stack
    K = B_d.shape[1]
    act, part_d = swiglu_lora(gate_up, grouped_shrink(x, A, rank, slots, 2), B, scaling, rank, A_d, rank_d, slots)
    y0 = torch.randn(x.shape[0], K)
    fused = grouped_expand_(y0.clone(), part_d, B_d, scaling_d, rank_d, slots, [K])
    unfused = grouped_lora_add_reference(y0.clone(), act, A_d, B_d, scaling_d, rank_d, in_range(slots), [K])
    assert_close(fused, unfused)
    assert not torch.allclose(fused, y0)  # the adapters did something


def test_shape_mistakes_are_one_line_errors():
    x, gate_up, (A, B, scaling, rank), (A_d, _, _, rank_d), slots = case(torch.float32)
    part = grouped_shrink(x, A, rank, slots, 2)
    with pytest.raises(LorakitError, match="gate_up must be"):
        swiglu_lora(gate_up[:, :-1], part, B, scaling, rank, A_d, rank_d, slots)
    with pytest.raises(LorakitError, match="A_d must be"):
        swiglu_lora(gate_up, part, B, scaling, rank, A_d[:, :, :-1], rank_d, slots)
    with pytest.raises(LorakitError, match="slot_of_row"):
        swiglu_lora(gate_up, part, B, scaling, rank, A_d, rank_d, slots[:-1])


def qkv_case(dtype, T=5, H=4, Hkv=2, D=16, R=4, slots=3, K=20, seed=3):
    """A fused q/k/v output (T, (H + 2 Hkv) D) with its LoRA: A, B, scaling, rank (mixed, NaN padding), the shrink's
    planes, rotary rows, positions (one inactive row) and caches."""
    g = torch.Generator().manual_seed(seed)
    splits = [H * D, Hkv * D, Hkv * D]
    N = sum(splits)
    rank = torch.tensor([[(R, 3, 0)[(s + j) % 3] for j in range(3)] for s in range(slots)], dtype=torch.int32)
    A = torch.full((slots, 3 * R, K), float("nan"))
    B = torch.full((slots, N, R), float("nan"))
    col = 0
    for j, n in enumerate(splits):
        for s in range(slots):
            r = int(rank[s, j])
            A[s, j * R:j * R + r] = torch.randn(r, K, generator=g) / K ** 0.5
            B[s, col:col + n, :r] = torch.randn(n, r, generator=g)
        col += n
    A, B = A.to(dtype), B.to(dtype)
    scaling = torch.rand(slots, 3, generator=g) + 0.5
    x = torch.randn(T, K, generator=g).to(dtype)
    qkv = torch.randn(T, N, generator=g).to(dtype)
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
