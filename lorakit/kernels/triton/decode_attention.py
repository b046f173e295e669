"""Triton kernels for one decode step: flash-decoding attention over a static KV cache, and rotary + cache store.

Flash-decoding: grid (B, Hkv, splits). A program takes all G = H // Hkv query heads of one kv head (padded to
``BLOCK_G >= 16`` rows so ``tl.dot`` runs on tensor cores) and the keys ``[start + split * split_len, start +
(split+1) * split_len) ∩ [start, length)`` of its row, in ``BLOCK_S`` blocks with an online softmax (base 2: scores
are pre-multiplied by ``scale * log2(e)``). ``start`` is 0, or ``max(0, length - window)`` for a sliding-window
layer (the query at position length - 1 attends keys p - window < k <= p, as transformers' mask): the splits then
cover the window, not the cache, and the keys before it are never read. The key loop stops at ``length``, so only
the valid K/V is read; a split wholly past the length reads nothing and writes (zeros, lse = -inf), which the
combine kernel weighs by exp2(-inf) = 0. With one split the program normalises and writes the output directly (no
scratch, no second launch).

The number of splits is chosen on the host from (B, Hkv, min(S_max, window), SM count) only: lengths live on the
device and change every step inside a CUDA graph. The grid is fixed by the shapes, so the step is graph safe.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lorakit.kernels._triton import pdl_launch, pdl_on
from lorakit.kernels.triton.grouped_lora import live_segment_low
from lorakit.kernels.triton.pdl import pdl_enter
from lorakit.kernels.triton.tanh import tanh_f32

_LOG2E = 1.4426950408889634
_MIN_SPLIT_KEYS = 256  # below this a split's fixed cost (q load, partial write, combine) outweighs its parallelism
# programs (row, kv head, split) wanted per SM. Measured on an H200 (bench/results/decode_attention_speed_h200.json):
# with 64 rows x 8 kv heads (512 programs, ~3.9 per SM) one split was fastest for head_dim 128 (41.3 us vs 43.4 at
# two) and 64 (21.2 vs 26.0); splitting pays only when rows x kv heads leave SMs idle (small batches, long context)
_PROGRAMS_PER_SM = 2
# the split kernel's tiles: keys per block (None: 64 for head_dim <= 128, else 32), warps, pipeline stages
# (bench/decode_attention_speed.py --tiles sweeps them on the GPU)
TILES = dict(block_s=None, num_warps=4, num_stages=3)


@triton.jit
def _flash_decode_split(Q, K, V, LENGTHS, ROWS, O, LSE, OUT,
                        stride_qb, stride_qh, stride_qd,
                        stride_kb, stride_kh, stride_ks, stride_kd,
                        stride_vb, stride_vh, stride_vs, stride_vd,
                        stride_ob, stride_oh, stride_od,
                        s_max, split_len, n_groups, head_dim, qk_scale, n_cache_rows, softcap_in, softcap_out, window,
                        NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
                        PDL: tl.constexpr, SOFTCAP: tl.constexpr = False):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    pdl_enter(PDL)
    length = tl.minimum(tl.maximum(tl.load(LENGTHS + b).to(tl.int32), 0), s_max)  # never read past the cache
    cb = b  # the cache row this q row reads
    if HAS_ROWS:
        cb = tl.load(ROWS + b).to(tl.int64)
        inside = (cb >= 0) & (cb < n_cache_rows)
        length = tl.where(inside, length, 0)  # a row outside the cache attends nothing
        cb = tl.where(inside, cb, 0)
    # the row's keys: [start, length); a sliding window (window < S_max) drops the ones before length - window
    start = tl.maximum(length - window, 0)
    lo = start + split * split_len
    hi = tl.minimum(lo + split_len, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < n_groups
    d_mask = d < head_dim
    heads = kvh * n_groups + g  # (BLOCK_G,) query heads of this kv head
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_G, BLOCK_D), input dtype

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = K + cb * stride_kb + kvh * stride_kh
    v_base = V + cb * stride_vb + kvh * stride_vh
    s_offs = tl.arange(0, BLOCK_S)
    for block in range(lo, hi, BLOCK_S):
        s = block + s_offs
        s_mask = s < hi
        kv_mask = s_mask[:, None] & d_mask[None, :]  # keys past the length are never loaded (may be NaN)
        k = tl.load(k_base + s[:, None] * stride_ks + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_G, BLOCK_S) float32
        if SOFTCAP:  # Gemma 2: cap * tanh(scale * s / cap) (softcap_in = scale / cap), then base 2
            scores = tanh_f32(scores * softcap_in) * softcap_out
        else:
            scores = scores * qk_scale
        scores = tl.where(s_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every block has >= 1 valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + s[:, None] * stride_vs + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        # p rounded to V's dtype for the tensor-core dot, as flash attention does (exact in float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]  # zeros where the split saw no key
    out_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(OUT + b * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
                 o.to(OUT.dtype.element_ty), mask=out_mask)
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))  # base-2 log-sum-exp of the split's scores
        row = (b * tl.num_programs(1) * n_groups + heads) * NUM_SPLITS + split  # scratch is (B, H, splits, ...)
        tl.store(O + row[:, None] * BLOCK_D + d[None, :], o, mask=out_mask)
        tl.store(LSE + row, lse, mask=g_mask)


@triton.jit
def _flash_decode_combine(O, LSE, OUT, stride_ob, stride_oh, stride_od, n_heads, head_dim,
                          NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
                          PDL: tl.constexpr):
    """One program per (b, h): out = sum_i w_i o_i / sum_i w_i with w_i = exp2(lse_i - max lse)."""
    bh = tl.program_id(0).to(tl.int64)
    pdl_enter(PDL)
    i = tl.arange(0, BLOCK_SPLITS)
    d = tl.arange(0, BLOCK_D)
    i_mask = i < NUM_SPLITS
    lse = tl.load(LSE + bh * NUM_SPLITS + i, mask=i_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # length 0: every split empty; weights exp2(-inf) = 0, output 0
    w = tl.exp2(lse - m)  # (BLOCK_SPLITS,)
    o = tl.load(O + (bh * NUM_SPLITS + i)[:, None] * BLOCK_D + d[None, :],
                mask=i_mask[:, None] & (d < head_dim)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    b = bh // n_heads
    h = bh % n_heads
    tl.store(OUT + b * stride_ob + h * stride_oh + d * stride_od, out.to(OUT.dtype.element_ty), mask=d < head_dim)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_splits(batch: int, kv_heads: int, s_max: int, sm_count: int, block_s: int) -> int:
    """Splits per (row, kv head): enough programs to fill ``_PROGRAMS_PER_SM`` per SM, each with at least
    ``_MIN_SPLIT_KEYS`` keys of S_max. Shapes only: never the lengths (device values that change per step)."""
    base = max(1, batch * kv_heads)
    want = -(-(_PROGRAMS_PER_SM * sm_count) // base)
    most = max(1, s_max // max(_MIN_SPLIT_KEYS, block_s))
    return max(1, min(want, most))


def split_plan(s_max: int, splits: int, block_s: int) -> tuple[int, int]:
    """(splits, keys per split) actually used: each split's key range is a whole number of ``block_s`` blocks, and
    the count is redone so that no split starts past S_max (``splits`` may come back smaller than asked)."""
    per_split = -(-s_max // max(1, splits))
    split_len = max(block_s, -(-per_split // block_s) * block_s)
    return max(1, -(-s_max // split_len)), split_len


def _blocks(head_dim: int, n_groups: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(n_groups))  # tl.dot wants >= 16 rows
    block_s = TILES["block_s"] or (64 if block_d <= 128 else 32)  # K and V tiles of <= 16 KiB in bf16 by default
    return block_g, block_s, block_d


def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                 scale: float, splits: int | None = None, rows: torch.Tensor | None = None,
                 softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """q (B, H, D), caches (B or C, Hkv, S, D), lengths (B,) int, rows None or (B,) int (the cache row of each q
    row), softcap None or > 0 (scores become softcap * tanh(scores / softcap)), window None or >= 1 (each row
    attends its last ``window`` keys: ``max(0, length - window) .. length - 1``) -> (B, H, D) in q's dtype. Shapes
    checked by caller."""
    b, h, d = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    n_groups = h // hkv
    block_g, block_s, block_d = _blocks(d, n_groups)
    span = s_max if window is None else max(1, min(s_max, int(window)))  # keys one row can attend
    if splits is None:
        sm = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
            if q.device.type == "cuda" else 1  # the CPU interpreter: fewer programs run faster
        splits = choose_splits(b, hkv, span, sm, block_s)
    splits, split_len = split_plan(span, splits, block_s)
    out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    if splits == 1:
        o_part = lse = out  # unused by the kernel when NUM_SPLITS == 1
    else:
        o_part = torch.empty((b, h, splits, block_d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # float32: exact products, like the reference
    pdl = pdl_on(q)
    _flash_decode_split[(b, hkv, splits)](
        q, k_cache, v_cache, lengths, lengths if rows is None else rows, o_part, lse, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        s_max, split_len, n_groups, d, float(scale) * _LOG2E, k_cache.shape[0],
        float(scale) / softcap if softcap else 0.0, softcap * _LOG2E if softcap else 0.0, span, NUM_SPLITS=splits, BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_D=block_d, DOT_PRECISION=precision,
        HAS_ROWS=rows is not None, PDL=pdl, SOFTCAP=bool(softcap), num_warps=TILES["num_warps"], num_stages=TILES["num_stages"],
        **pdl_launch(pdl))
    if splits > 1:
        _flash_decode_combine[(b * h,)](o_part, lse, out, *out.stride(), h, d, NUM_SPLITS=splits,
                                        BLOCK_SPLITS=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d,
                                        PDL=pdl, num_warps=1 if block_d <= 64 else 2, **pdl_launch(pdl))
    return out


# -- rotary embedding + cache store ---------------------------------------------------------------------------------

@triton.jit
def _plus(x, ptr, mask):
    """x + the values at ptr, rounded to x's dtype (what an in-place add of the delta would leave)."""
    return (x.to(tl.float32) + tl.load(ptr, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)


@triton.jit
def _plus_value(x, delta):
    """x + delta (float32), the delta rounded to x's dtype first, then the sum (as ``_plus`` of a stored delta)."""
    return (x.to(tl.float32) + delta.to(x.dtype).to(tl.float32)).to(x.dtype)


@triton.jit
def _rope_store(Q, K, V, DQ, DK, DV, COS, SIN, POS, ROWS, KC, VC,
                PART, BL, SCALE, RANK, SLOTS,
                stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_kd, stride_vb, stride_vh, stride_vd,
                stride_cb, stride_cd, stride_sb, stride_sd,
                stride_kcb, stride_kch, stride_kcs, stride_kcd, stride_vcb, stride_vch, stride_vcs, stride_vcd,
                stride_ps, stride_pm, stride_bs, stride_bn, stride_br, stride_ss, stride_rs,
                n_heads, n_kv_heads, s_max, half, n_cache_rows, n_slots, HAS_DELTA: tl.constexpr,
                HAS_ROWS: tl.constexpr, HAS_LORA: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr,
                SPLIT: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    """Program (b, j): j < H rotates q[b, j] in place; j >= H rotates k[b, j-H] into the cache and copies v.
    HAS_DELTA: q, k, v are first replaced by q + dq, k + dk, v + dv (rounded to their dtype; the deltas have
    q's, k's and v's strides), and q + dq is what q holds afterwards (rotated).
    HAS_LORA: the same, with the deltas computed here by the grouped expand of the q/k/v LoRA from the shrink's
    planes PART (P, B, 3R) and the stacked BL (slots, Hq*D + 2*Hkv*D, R), SCALE, RANK (slots, 3) of row b's slot."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    i = tl.arange(0, BLOCK_HALF)
    mask = i < half
    if HAS_LORA:  # the row's adapter: its slot (an input of the step, written before it), then B's two half tiles
        slot = tl.load(SLOTS + b).to(tl.int64)
        live = (slot >= 0) & (slot < n_slots)
        s = tl.where(live, slot, 0)
        seg = tl.where(j < n_heads, 0, 1)
        col0 = j * 2 * half  # q head j, or k head j - H (the k heads follow the q heads in the fused output)
        offs_r = tl.arange(0, BLOCK_R)
        r_live = offs_r < tl.where(live, R, 0)
        b_base = BL + s * stride_bs
        b1 = tl.load(b_base + (col0 + i)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=mask[:, None] & r_live[None, :], other=0.0)
        b2 = tl.load(b_base + (col0 + half + i)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=mask[:, None] & r_live[None, :], other=0.0)
    pdl_enter(PDL)
    if HAS_LORA:
        part_row = PART + b * stride_pm
        low, rank = live_segment_low(part_row, stride_ps, SCALE + s * stride_ss, RANK + s * stride_rs, live, seg,
                                     R, BLOCK_R, SPLIT)
        keep = offs_r[None, :] < rank  # B's columns past the segment's rank may hold anything
        d1 = tl.sum(tl.where(keep, b1.to(tl.float32), 0.0) * low[None, :], axis=1)
        d2 = tl.sum(tl.where(keep, b2.to(tl.float32), 0.0) * low[None, :], axis=1)
    cos1 = tl.load(COS + b * stride_cb + i * stride_cd, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + b * stride_cb + (i + half) * stride_cd, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + b * stride_sb + i * stride_sd, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + b * stride_sb + (i + half) * stride_sd, mask=mask, other=0.0).to(tl.float32)
    if j < n_heads:
        ptr = Q + b * stride_qb + j.to(tl.int64) * stride_qh
        x1 = tl.load(ptr + i * stride_qd, mask=mask, other=0.0)
        x2 = tl.load(ptr + (i + half) * stride_qd, mask=mask, other=0.0)
        if HAS_DELTA:
            dptr = DQ + b * stride_qb + j.to(tl.int64) * stride_qh
            x1 = _plus(x1, dptr + i * stride_qd, mask)
            x2 = _plus(x2, dptr + (i + half) * stride_qd, mask)
        if HAS_LORA:
            x1 = _plus_value(x1, d1)
            x2 = _plus_value(x2, d2)
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        # rotate_half(x) = cat(-x2, x1): out = cat(x1*cos1 - x2*sin1, x2*cos2 + x1*sin2)
        tl.store(ptr + i * stride_qd, (x1 * cos1 - x2 * sin1).to(Q.dtype.element_ty), mask=mask)
        tl.store(ptr + (i + half) * stride_qd, (x2 * cos2 + x1 * sin2).to(Q.dtype.element_ty), mask=mask)
    else:
        kh = (j - n_heads).to(tl.int64)
        pos = tl.load(POS + b).to(tl.int64)
        cb = b  # the cache row of this q row
        inside = (pos >= 0) & (pos < s_max)
        if HAS_ROWS:
            cb = tl.load(ROWS + b).to(tl.int64)
            inside = inside & (cb >= 0) & (cb < n_cache_rows)
        if inside:  # inactive rows (pos < 0), out-of-range positions and rows outside the cache write nothing
            kp = K + b * stride_kb + kh * stride_kh
            x1 = tl.load(kp + i * stride_kd, mask=mask, other=0.0)
            x2 = tl.load(kp + (i + half) * stride_kd, mask=mask, other=0.0)
            if HAS_DELTA:
                dkp = DK + b * stride_kb + kh * stride_kh
                x1 = _plus(x1, dkp + i * stride_kd, mask)
                x2 = _plus(x2, dkp + (i + half) * stride_kd, mask)
            if HAS_LORA:
                x1 = _plus_value(x1, d1)
                x2 = _plus_value(x2, d2)
            x1 = x1.to(tl.float32)
            x2 = x2.to(tl.float32)
            kc = KC + cb * stride_kcb + kh * stride_kch + pos * stride_kcs
            tl.store(kc + i * stride_kcd, (x1 * cos1 - x2 * sin1).to(KC.dtype.element_ty), mask=mask)
            tl.store(kc + (i + half) * stride_kcd, (x2 * cos2 + x1 * sin2).to(KC.dtype.element_ty), mask=mask)
            vp = V + b * stride_vb + kh * stride_vh
            vc = VC + cb * stride_vcb + kh * stride_vch + pos * stride_vcs
            v1 = tl.load(vp + i * stride_vd, mask=mask, other=0.0)
            v2 = tl.load(vp + (i + half) * stride_vd, mask=mask, other=0.0)
            if HAS_DELTA:
                dvp = DV + b * stride_vb + kh * stride_vh
                v1 = _plus(v1, dvp + i * stride_vd, mask)
                v2 = _plus(v2, dvp + (i + half) * stride_vd, mask)
            if HAS_LORA:  # v's segment: its own low-rank vector and B's columns after all q and k heads
                vcol = (n_heads + n_kv_heads + kh) * 2 * half
                low_v, rank_v = live_segment_low(part_row, stride_ps, SCALE + s * stride_ss, RANK + s * stride_rs,
                                                 live, 2, R, BLOCK_R, SPLIT)
                keep_v = mask[:, None] & (offs_r[None, :] < rank_v)
                bv1 = tl.load(b_base + (vcol + i)[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=keep_v, other=0.0)
                bv2 = tl.load(b_base + (vcol + half + i)[:, None] * stride_bn + offs_r[None, :] * stride_br, mask=keep_v,
                              other=0.0)
                v1 = _plus_value(v1, tl.sum(bv1.to(tl.float32) * low_v[None, :], axis=1))
                v2 = _plus_value(v2, tl.sum(bv2.to(tl.float32) * low_v[None, :], axis=1))
            tl.store(vc + i * stride_vcd, v1.to(VC.dtype.element_ty), mask=mask)
            tl.store(vc + (i + half) * stride_vcd, v2.to(VC.dtype.element_ty), mask=mask)


def rope_store_kernel_(q, k, v, cos, sin, positions, k_cache, v_cache, delta=None, rows=None, lora=None) -> None:
    """See ``lorakit.kernels.decode_attention.rope_store_``; shapes checked by the caller, cos/sin float32;
    delta: None or (dq, dk, dv) with q's, k's and v's shapes and strides; rows: None or the cache row of each row;
    lora: None or (part (P, B, 3R) float32, B (slots, (H + 2 Hkv) D, R), scaling (slots, 3), rank (slots, 3),
    slot_of_row (B,)), contiguous scaling and rank."""
    b, h, d = q.shape
    hkv = k.shape[1]
    half = d // 2
    dq, dk, dv = (q, k, v) if delta is None else delta
    part, BL, scaling, rank, slots = (positions,) * 5 if lora is None else lora
    R = 1 if lora is None else BL.shape[2]
    lora_strides = (0,) * 7 if lora is None else (part.stride(0), part.stride(1), *BL.stride(), scaling.stride(0),
                                                  rank.stride(0))
    pdl = pdl_on(q)
    _rope_store[(b, h + hkv)](
        q, k, v, dq, dk, dv, cos, sin, positions, positions if rows is None else rows, k_cache, v_cache,
        part, BL, scaling, rank, slots,
        *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(), *k_cache.stride(), *v_cache.stride(),
        *lora_strides,
        h, hkv, k_cache.shape[2], half, k_cache.shape[0], 0 if lora is None else BL.shape[0],
        HAS_DELTA=delta is not None, HAS_ROWS=rows is not None, HAS_LORA=lora is not None, R=R,
        BLOCK_R=max(2, triton.next_power_of_2(R)), SPLIT=1 if lora is None else part.shape[0],
        BLOCK_HALF=max(16, triton.next_power_of_2(half)), PDL=pdl, num_warps=1, **pdl_launch(pdl))
