"""decode_attention (flash-decoding over a static KV cache) and rope_store_ (rotary + cache store): the Triton kernels
(run by the interpreter, conftest sets TRITON_INTERPRET=1) vs the PyTorch references vs independent float64 formulas
and transformers' apply_rotary_pos_emb, on awkward shapes, with garbage (NaN/inf) in the unused cache tail."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.kernels import decode_attention as da
from lorakit.kernels.decode_attention import (decode_attention, decode_attention_reference, rope_store_,
                                              rope_store_reference_)
from conftest import assert_close

DTYPES = [torch.float32, torch.float16]  # the interpreter has no bf16; bf16 is checked by bench/decode_attention_speed.py

# (B, H, Hkv, D, S_max, lengths): GQA with G=3 and G=2, MHA, D=64 and D=80 (not a power of two), lengths 0, 1, S_max
CASES = [
    (3, 6, 2, 64, 37, [0, 1, 37]),
    (3, 6, 3, 80, 130, [1, 130, 0]),
    (3, 6, 6, 64, 130, [65, 0, 129]),
]


def naive_float64(q, k_cache, v_cache, lengths, scale, window=None):
    """The textbook formula, one (row, head) at a time in float64; only the valid keys are ever touched (with a
    window: the query at p = n - 1 sees keys p - window < k <= p, transformers' sliding_window_overlay)."""
    b, h, d = q.shape
    g = h // k_cache.shape[1]
    out = torch.zeros(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        if n == 0:
            continue
        first = 0 if window is None else max(0, (n - 1) - window + 1)
        for j in range(h):
            k = k_cache[i, j // g, first:n].double()
            v = v_cache[i, j // g, first:n].double()
            p = torch.softmax((k @ q[i, j].double()) * scale, dim=0)
            out[i, j] = p @ v
    return out


def make_cache(b, hkv, s, d, lengths, dtype, garbage=True):
    k = torch.randn(b, hkv, s, d).to(dtype)
    v = torch.randn(b, hkv, s, d).to(dtype)
    if garbage:  # what a static cache holds past the length: anything, NaN and inf included
        for i, n in enumerate(lengths):
            k[i, :, n:] = float("nan")
            v[i, :, n:] = float("inf")
            if n < s:
                k[i, :, -1] = float("-inf")
    return k, v


def split_count(s_max, splits, d, h, hkv):
    from lorakit.kernels.triton.decode_attention import _blocks, split_plan

    return split_plan(s_max, splits, _blocks(d, h // hkv)[1])[0]


# -- decode_attention ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}D{c[3]}S{c[4]}")
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_decode_attention_matches_reference_and_float64(dtype, case, splits):
    b, h, hkv, d, s, lens = case
    lengths = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(b, h, d).to(dtype)
    k, v = make_cache(b, hkv, s, d, lens, dtype)
    scale = 1 / math.sqrt(d)
    out = decode_attention(q, k, v, lengths, scale, splits=splits)
    ref = decode_attention_reference(q, k, v, lengths, scale)
    truth = naive_float64(q, k, v, lengths, scale)
    assert out.shape == (b, h, d) and out.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert_close(out, ref)
    assert_close(out, truth, dtype)
    assert_close(ref, truth, dtype)
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[i], torch.zeros_like(out[i])), "a row with length 0 must come out as zeros"


def test_forced_splits_really_split():
    """The cases above exercise the combine kernel: S_max=130 with splits=3 runs 3 key ranges of 64 keys."""
    assert split_count(130, 3, 64, 6, 2) == 3
    assert split_count(130, 3, 80, 6, 3) == 3
    assert split_count(37, 3, 64, 6, 2) == 1  # a 64-key block already covers S_max: one split, direct store
    assert split_count(130, 1, 64, 6, 2) == 1


@pytest.mark.parametrize("splits", [1, 3])
def test_garbage_past_the_length_never_reaches_the_result(splits):
    b, h, hkv, d, s, lens = CASES[1]
    lengths = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(b, h, d, dtype=torch.float16)
    k, v = make_cache(b, hkv, s, d, lens, torch.float16, garbage=False)
    clean = decode_attention(q, k, v, lengths, 0.1, splits=splits)
    k2, v2 = k.clone(), v.clone()
    for i, n in enumerate(lens):
        k2[i, :, n:], v2[i, :, n:] = float("nan"), float("inf")
    assert torch.equal(decode_attention(q, k2, v2, lengths, 0.1, splits=splits), clean)


def test_non_contiguous_q_and_int64_lengths():
    b, h, hkv, d, s = 3, 6, 2, 64, 37
    lens = [5, 37, 20]
    q_t = torch.randn(h, b, d)  # q as a (B, H, D) view with batch stride D and head stride B*D
    q = q_t.transpose(0, 1)
    k, v = make_cache(b, hkv, s, d, lens, torch.float32)
    lengths = torch.tensor(lens, dtype=torch.int64)
    out = decode_attention(q, k, v, lengths, 0.125, splits=1)
    assert_close(out, naive_float64(q, k, v, lengths, 0.125), torch.float32)


def test_out_of_range_lengths_are_clamped():
    """Lengths must lie in [0, S_max]; outside it the kernel clamps rather than read past the cache."""
    b, h, hkv, d, s = 3, 6, 2, 64, 37
    q = torch.randn(b, h, d)
    k, v = make_cache(b, hkv, s, d, [s, s, s], torch.float32)
    bad = torch.tensor([-3, s + 50, 2], dtype=torch.int32)
    good = torch.tensor([0, s, 2], dtype=torch.int32)
    out = decode_attention(q, k, v, bad, 0.125, splits=1)
    assert_close(out, decode_attention(q, k, v, good, 0.125, splits=1))
    assert_close(decode_attention_reference(q, k, v, bad, 0.125), out)


def test_disable_triton_uses_the_reference(monkeypatch):
    import lorakit.kernels.triton.decode_attention as tri

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path ran although LORAKIT_DISABLE_TRITON=1")

    monkeypatch.setattr(tri, "flash_decode", boom)
    monkeypatch.setattr(tri, "rope_store_kernel_", boom)
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")
    b, h, hkv, d, s = 2, 4, 2, 64, 9
    q = torch.randn(b, h, d)
    k, v = make_cache(b, hkv, s, d, [3, 9], torch.float32)
    lengths = torch.tensor([3, 9], dtype=torch.int32)
    assert torch.equal(decode_attention(q, k, v, lengths, 0.125), decode_attention_reference(q, k, v, lengths, 0.125))
    kk, vv, cos, sin = torch.randn(b, hkv, d), torch.randn(b, hkv, d), torch.randn(b, d), torch.randn(b, d)
    rope_store_(q, kk, vv, cos, sin, torch.tensor([0, 1]), k, v)  # the reference: no exception


def test_choose_splits_depends_on_shapes_only():
    from lorakit.kernels.triton.decode_attention import choose_splits

    assert choose_splits(64, 8, 1024, 132, 64) == 1  # 512 programs fill 2 per SM on an H200 (measured fastest)
    assert choose_splits(16, 8, 1024, 132, 64) == 3  # 128 programs: split to reach 2 per SM
    assert choose_splits(1, 8, 8192, 132, 64) == 32  # one long row: split its keys over the SMs
    assert choose_splits(1, 8, 100, 132, 64) == 1  # short caches are not split
    assert choose_splits(256, 8, 4096, 132, 64) == 1  # the batch fills the GPU already


@pytest.mark.parametrize("make, match", [
    (lambda: (torch.randn(2, 6, 64), torch.randn(2, 4, 9, 64), torch.zeros(2, dtype=torch.int32)), "multiple"),
    (lambda: (torch.randn(2, 6, 64), torch.randn(2, 2, 9, 80), torch.zeros(2, dtype=torch.int32)), "head_dim"),
    (lambda: (torch.randn(2, 6, 64), torch.randn(3, 2, 9, 64), torch.zeros(3, dtype=torch.int32)), "batch"),
    (lambda: (torch.randn(2, 6, 64), torch.randn(2, 2, 9, 64), torch.zeros(3, dtype=torch.int32)), "lengths"),
    (lambda: (torch.randn(2, 6, 64), torch.randn(2, 2, 9, 64), torch.zeros(2, 1, dtype=torch.int32)), "lengths"),
    (lambda: (torch.randn(2, 6, 64), torch.randn(2, 2, 9, 64), torch.zeros(2)), "int32"),
    (lambda: (torch.randn(2, 6, 64).half(), torch.randn(2, 2, 9, 64), torch.zeros(2, dtype=torch.int32)), "dtype"),
    (lambda: (torch.randn(6, 64), torch.randn(2, 2, 9, 64), torch.zeros(2, dtype=torch.int32)), "q must be"),
])
def test_decode_attention_errors(make, match):
    q, k, lengths = make()
    with pytest.raises(LorakitError, match=match) as info:
        decode_attention(q, k, k.clone(), lengths, 0.1)
    assert "\n" not in str(info.value)
    with pytest.raises(LorakitError, match="splits"):
        decode_attention(torch.randn(1, 2, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16),
                         torch.ones(1, dtype=torch.int32), 0.1, splits=0)


# -- sliding windows ----------------------------------------------------------------------------------------------

# (B, H, Hkv, D, S_max, lengths, window): windows smaller and larger than the lengths, window 1, a window past S_max,
# GQA G=3 / G=2 / MHA, D=33 (odd) and 80, lengths 0, 1 and S_max in one batch; S_max=300 with window 150 and
# splits=3 runs three 64-key splits over the window (the first starting at length - 150, not 0)
WINDOW_CASES = [
    (4, 6, 2, 64, 300, [300, 200, 151, 10], 150),
    (4, 6, 3, 33, 70, [70, 0, 1, 45], 1),
    (3, 6, 6, 80, 130, [130, 64, 7], 7),
    (3, 4, 2, 64, 37, [37, 20, 0], 36),
    (2, 4, 1, 40, 37, [37, 5], 500),
]


def poison_outside_window(k, v, lengths, window):
    """NaN / inf in every key before each row's window (and past its length): read once, they would poison it."""
    k, v = k.clone(), v.clone()
    for i, n in enumerate(lengths):
        first = max(0, n - window)
        k[i, :, :first], v[i, :, :first] = float("nan"), float("inf")
        k[i, :, n:], v[i, :, n:] = float("nan"), float("inf")
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}D{c[3]}S{c[4]}W{c[6]}")
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_windowed_attention_matches_reference_and_float64(dtype, case, splits, monkeypatch):
    from lorakit.kernels.triton import decode_attention as tda

    calls = []
    real = tda.flash_decode
    monkeypatch.setattr(tda, "flash_decode", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    b, h, hkv, d, s, lens, window = case
    lengths = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(b, h, d).to(dtype)
    k, v = poison_outside_window(*make_cache(b, hkv, s, d, lens, dtype, garbage=False), lens, window)
    scale = 1 / math.sqrt(d)
    out = decode_attention(q, k, v, lengths, scale, splits=splits, window=window)
    ref = decode_attention_reference(q, k, v, lengths, scale, window=window)
    truth = naive_float64(q, k, v, lengths, scale, window)
    assert len(calls) == 1  # the kernel ran
    assert out.shape == (b, h, d) and out.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert_close(out, ref)
    assert_close(out, truth, dtype)
    assert_close(ref, truth, dtype)
    if window < s:  # the window matters: full attention over the same (clean) keys differs
        clean_k, clean_v = make_cache(b, hkv, s, d, lens, torch.float32, garbage=False)
        longest = max(range(b), key=lambda i: lens[i])
        full = naive_float64(q, clean_k, clean_v, lengths, scale)[longest]
        windowed = naive_float64(q, clean_k, clean_v, lengths, scale, window)[longest]
        assert (full - windowed).abs().max() > 1e-3
    if window == 1:  # one key: the output is that key's value, whatever the scores
        for i, n in enumerate(lens):
            if n:
                g = h // hkv
                assert_close(out[i], v[i, :, n - 1].repeat_interleave(g, dim=0), dtype)


def test_window_splits_cover_the_window_not_the_cache():
    """The split plan is made for min(S_max, window) keys: a window of 150 in a 300-key cache asked for 3 splits
    gets 3 splits of 64 keys (the three above cover the window), and a short window one split."""
    assert split_count(150, 3, 64, 6, 2) == 3
    assert split_count(300, 8, 64, 6, 2) == 5
    assert split_count(7, 3, 80, 6, 6) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_with_rows_matches_per_token_reference(dtype):
    """Prefill: tokens of a prompt share a cache row, each with its own length, and each sees its own window."""
    T, h, hkv, d, s, C, window = 6, 4, 2, 24, 20, 2, 3
    rows = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.int32)
    lengths = torch.tensor([1, 2, 5, 9, 4, 20], dtype=torch.int32)
    q = torch.randn(T, h, d).to(dtype)
    k, v = torch.randn(C, hkv, s, d).to(dtype), torch.randn(C, hkv, s, d).to(dtype)
    out = decode_attention(q, k, v, lengths, 0.3, rows=rows, window=window)
    assert_close(out, decode_attention_reference(q, k, v, lengths, 0.3, rows=rows, window=window))
    for t in range(T):
        r = int(rows[t])
        alone = naive_float64(q[t:t + 1], k[r:r + 1], v[r:r + 1], lengths[t:t + 1], 0.3, window)
        assert_close(out[t:t + 1], alone, dtype)


def test_window_with_softcap_matches_reference():
    b, h, hkv, d, s, lens = 3, 4, 2, 32, 140, [140, 70, 2]
    lengths = torch.tensor(lens, dtype=torch.int32)
    q, (k, v) = torch.randn(b, h, d) * 3, make_cache(b, hkv, s, d, lens, torch.float32, garbage=False)
    for splits in (1, 2):
        out = decode_attention(q, k, v, lengths, 0.5, splits=splits, softcap=1.5, window=65)
        assert_close(out, decode_attention_reference(q, k, v, lengths, 0.5, softcap=1.5, window=65))
        assert (out - decode_attention(q, k, v, lengths, 0.5, splits=splits, window=65)).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_window_errors(bad):
    with pytest.raises(LorakitError, match="window must be None or an int >= 1") as info:
        decode_attention(torch.randn(1, 2, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16),
                         torch.ones(1, dtype=torch.int32), 0.1, window=bad)
    assert "\n" not in str(info.value)


# -- rope_store_ --------------------------------------------------------------------------------------------------

def fused_views(b, h, hkv, d, dtype, layout):
    """q, k, v as views of one qkv projection output, the way a fused-projection model hands them over."""
    width = h * d + 2 * hkv * d
    if layout == "rows":  # (B, width + pad): batch stride not a multiple of anything handy
        buf = torch.randn(b, width + 7).to(dtype)
        q = buf[:, :h * d].view(b, h, d)
        k = buf[:, h * d:h * d + hkv * d].view(b, hkv, d)
        v = buf[:, h * d + hkv * d:width].view(b, hkv, d)
    else:  # "heads_first": (H + 2Hkv, B, D) transposed, so the head stride is B*D and the batch stride D
        buf = torch.randn(h + 2 * hkv, b, d).to(dtype)
        q, k, v = (buf[:h].transpose(0, 1), buf[h:h + hkv].transpose(0, 1), buf[h + hkv:].transpose(0, 1))
    return buf, q, k, v


def rope_inputs(b, d, positions, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = positions.clamp(min=0).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "heads_first"])
@pytest.mark.parametrize("d, hkv", [(64, 2), (80, 3)])
def test_rope_store_matches_reference(dtype, layout, d, hkv):
    b, h, s = 3, 6, 11
    positions = torch.tensor([4, -1, 10], dtype=torch.int32)  # row 1 inactive
    cos, sin = rope_inputs(b, d, positions)
    _, q, k, v = fused_views(b, h, hkv, d, dtype, layout)
    k_cache, v_cache = torch.randn(b, hkv, s, d).to(dtype), torch.randn(b, hkv, s, d).to(dtype)
    q_before, q_ref, kc_ref, vc_ref = q.clone(), q.clone(), k_cache.clone(), v_cache.clone()
    k_before, v_before, kc_before, vc_before = k.clone(), v.clone(), k_cache.clone(), v_cache.clone()
    rope_store_(q, k, v, cos, sin, positions, k_cache, v_cache)
    rope_store_reference_(q_ref, k.clone(), v.clone(), cos, sin, positions, kc_ref, vc_ref)
    assert_close(q, q_ref)
    assert_close(k_cache, kc_ref)
    assert torch.equal(v_cache, vc_ref)
    assert torch.equal(k, k_before) and torch.equal(v, v_before), "k and v are inputs, not rotated in place"
    # only k_cache[b, :, positions[b]] changed, and nothing in the inactive row
    changed = (k_cache != kc_before).any(dim=-1) | (v_cache != vc_before).any(dim=-1)  # (B, Hkv, S)
    expected = torch.zeros_like(changed)
    expected[0, :, 4] = True
    expected[2, :, 10] = True
    assert torch.equal(changed, expected)
    # the reference against the float64 formula (the kernel against the reference above)
    assert_close(q_ref, _rot64(q_before, cos, sin), dtype)
    assert_close(kc_ref[2, :, 10], _rot64(k_before, cos, sin)[2], dtype)
    assert torch.equal(v_cache[0, :, 4], v_before[0]) and torch.equal(v_cache[2, :, 10], v_before[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["rows", "heads_first"])
def test_rope_store_adds_a_delta_first(dtype, layout, monkeypatch):
    """delta=(dq, dk, dv) (views of a second qkv buffer with the same layout): the kernel stores what the reference
    stores for q + dq, k + dk, v + dv rounded to their dtype; q holds rope(q + dq), k and v are unchanged."""
    from lorakit.kernels.triton import decode_attention as tda

    calls = []
    real = tda.rope_store_kernel_
    monkeypatch.setattr(tda, "rope_store_kernel_", lambda *a: calls.append(1) or real(*a))
    b, h, hkv, d, s = 3, 6, 2, 64, 11
    positions = torch.tensor([4, -1, 10], dtype=torch.int32)
    cos, sin = rope_inputs(b, d, positions)
    _, q, k, v = fused_views(b, h, hkv, d, dtype, layout)
    _, dq, dk, dv = fused_views(b, h, hkv, d, dtype, layout)
    k_cache, v_cache = torch.randn(b, hkv, s, d).to(dtype), torch.randn(b, hkv, s, d).to(dtype)
    kc_ref, vc_ref, k_before, v_before = k_cache.clone(), v_cache.clone(), k.clone(), v.clone()
    q_ref = q + dq
    rope_store_reference_(q_ref, k + dk, v + dv, cos, sin, positions, kc_ref, vc_ref)
    rope_store_(q, k, v, cos, sin, positions, k_cache, v_cache, delta=(dq, dk, dv))
    assert calls == [1]
    assert_close(q, q_ref)
    assert_close(k_cache, kc_ref)
    assert torch.equal(v_cache, vc_ref)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)
    assert not torch.equal(v_cache[0, :, 4], v_before[0])  # the delta really reached the cache
    with pytest.raises(LorakitError, match="delta must be"):
        rope_store_(q, k, v, cos, sin, positions, k_cache, v_cache, delta=(dq, dk))


def _rot64(x, cos, sin):
    x = x.double()
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.double()[:, None] + rot * sin.double()[:, None]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_matches_float64_and_transformers(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    b, h, hkv, d, s = 3, 6, 2, 64, 40
    config = LlamaConfig(hidden_size=h * d, num_attention_heads=h, num_key_value_heads=hkv,
                         max_position_embeddings=64, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 17, 39], dtype=torch.int64)
    q0, k0, v0 = torch.randn(b, h, d).to(dtype), torch.randn(b, hkv, d).to(dtype), torch.randn(b, hkv, d).to(dtype)
    # transformers' own path in the model dtype: cos/sin come back in x's dtype, products rounded to it
    cos_hf, sin_hf = rotary(q0, positions[:, None])  # (B, 1, D) in dtype
    q_hf, k_hf = apply_rotary_pos_emb(q0[:, :, None], k0[:, :, None], cos_hf, sin_hf)  # (B, H, 1, D)
    cos32, sin32 = rotary(torch.empty(0), positions[:, None])  # float32 rows, what the decode path gathers
    cos32, sin32 = cos32[:, 0], sin32[:, 0]
    q = q0.clone()
    k_cache = torch.full((b, hkv, s, d), float("nan")).to(dtype)
    v_cache = torch.full((b, hkv, s, d), float("nan")).to(dtype)
    rope_store_(q, k0, v0, cos32, sin32, positions, k_cache, v_cache)
    k_new = k_cache[torch.arange(b), :, positions]  # (B, Hkv, D)
    assert_close(q, q_hf[:, :, 0])
    assert_close(k_new, k_hf[:, :, 0])
    assert_close(q, _rot64(q0, cos32, sin32), dtype)
    assert_close(k_new, _rot64(k0, cos32, sin32), dtype)
    assert torch.equal(v_cache[torch.arange(b), :, positions], v0)
    assert torch.isnan(k_cache[0, :, 1:]).all(), "positions other than positions[b] must stay as they were"


def test_rope_store_out_of_range_position_writes_nothing():
    b, h, hkv, d, s = 2, 4, 2, 64, 5
    positions = torch.tensor([5, -7], dtype=torch.int64)  # S_max itself and a negative: both write nothing
    cos, sin = rope_inputs(b, d, positions)
    q, k, v = torch.randn(b, h, d), torch.randn(b, hkv, d), torch.randn(b, hkv, d)
    k_cache, v_cache = torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    kc, vc = k_cache.clone(), v_cache.clone()
    q_ref = q.clone()
    rope_store_(q, k, v, cos, sin, positions, k_cache, v_cache)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    rope_store_reference_(q_ref, k, v, cos, sin, positions, kc, vc)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
    assert_close(q, q_ref)


@pytest.mark.parametrize("change, match", [
    ({"k": (2, 3, 64), "v": (2, 3, 64)}, "multiple"),
    ({"k": (2, 2, 32)}, "k and v"),
    ({"cos": (2, 32)}, "cos"),
    ({"positions": "float"}, "positions"),
    ({"positions": (3,)}, "positions"),
    ({"k_cache": (2, 2, 5, 32)}, "k_cache"),
    ({"q": (2, 4, 63), "k": (2, 2, 63), "v": (2, 2, 63)}, "even"),
])
def test_rope_store_errors(change, match):
    shapes = {"q": (2, 4, 64), "k": (2, 2, 64), "v": (2, 2, 64), "cos": (2, 64), "sin": (2, 64),
              "k_cache": (2, 2, 5, 64), "v_cache": (2, 2, 5, 64)}
    positions = torch.zeros(2, dtype=torch.int32)
    for name, value in change.items():
        if name == "positions":
            positions = torch.zeros(2) if value == "float" else torch.zeros(*value, dtype=torch.int32)
        else:
            shapes[name] = value
    t = {name: torch.randn(*shape) for name, shape in shapes.items()}
    with pytest.raises(LorakitError, match=match) as info:
        rope_store_(t["q"], t["k"], t["v"], t["cos"], t["sin"], positions, t["k_cache"], t["v_cache"])
    assert "\n" not in str(info.value)


def test_rotate_half_float_is_the_hf_formula():
    x, cos, sin = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8)
    assert_close(da.rotate_half_float(x, cos, sin), _rot64(x, cos, sin), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_map_query_tokens_to_cache_rows(dtype, monkeypatch):
    """rows=: prefill tokens (each with its own length) attend their prompt's cache row, and rope_store_ writes each
    token's rotated k / v at its (row, position); kernels (checked taken) equal the references and a per-token
    computation through the plain (rows=None) reference; pos -1 and a row outside the cache store nothing and
    attend nothing."""
    from lorakit.kernels.triton import decode_attention as tda

    calls = []
    for name in ("rope_store_kernel_", "flash_decode"):
        real = getattr(tda, name)
        monkeypatch.setattr(tda, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    T, h, hkv, d, s, C = 7, 4, 2, 32, 9, 3
    rows = torch.tensor([2, 2, 2, 0, 0, 5, 1], dtype=torch.int32)  # 5 is outside the 3-row cache
    positions = torch.tensor([0, 1, 2, 0, -1, 3, 4], dtype=torch.int32)  # token 4 is padding
    cos, sin = rope_inputs(T, d, positions)
    q, k, v = (torch.randn(T, n, d).to(dtype) for n in (h, hkv, hkv))
    k_cache, v_cache = torch.randn(C, hkv, s, d).to(dtype), torch.randn(C, hkv, s, d).to(dtype)
    kc_ref, vc_ref, q_ref, kc_before = k_cache.clone(), v_cache.clone(), q.clone(), k_cache.clone()
    rope_store_(q, k, v, cos, sin, positions, k_cache, v_cache, rows=rows)
    rope_store_reference_(q_ref, k, v, cos, sin, positions, kc_ref, vc_ref, rows=rows)
    assert_close(q, q_ref)
    assert_close(k_cache, kc_ref)
    assert torch.equal(v_cache, vc_ref)
    changed = (k_cache != kc_before).any(dim=-1).any(dim=1)  # (C, S)
    expected = torch.zeros_like(changed)
    for r, p in ((2, 0), (2, 1), (2, 2), (0, 0), (1, 4)):
        expected[r, p] = True
    assert torch.equal(changed, expected)
    assert torch.equal(v_cache[1, :, 4], v[6])
    lengths = torch.where(positions >= 0, positions + 1, 0)
    out = decode_attention(q, k_cache, v_cache, lengths, 0.3, rows=rows)
    ref = decode_attention_reference(q, k_cache, v_cache, lengths, 0.3, rows=rows)
    assert_close(out, ref)
    for t in range(T):  # each token alone through the rows=None reference on its own cache row
        r = int(rows[t])
        if r >= C:
            assert torch.equal(out[t], torch.zeros_like(out[t]))
            continue
        alone = decode_attention_reference(q[t:t + 1], k_cache[r:r + 1], v_cache[r:r + 1], lengths[t:t + 1], 0.3)
        assert_close(out[t:t + 1], alone)
    assert len(calls) == 2
    with pytest.raises(LorakitError, match="rows must be a"):
        decode_attention(q, k_cache, v_cache, lengths, 0.3, rows=rows[:3])
