"""One decode step of a Llama-family model over a static KV cache: attention for one new token per row, and the
rotary embedding + cache store that precedes it. Both are CUDA-graph safe: no host syncs, no data-dependent shapes
or grids; everything that changes per step (``lengths``, ``positions``) lives in device tensors.

``decode_attention(q, k_cache, v_cache, lengths, scale, window=None)``
    q (B, H, D) one query token per row, already rotated; k_cache, v_cache (B, Hkv, S_max, D) one layer of the
    cache; lengths (B,) int32/int64 on q's device: keys ``0 .. lengths[b]-1`` of row b are valid, the rest may hold
    garbage (NaN/inf) and never reach the result. Grouped-query attention: query head h reads kv head
    ``h // (H // Hkv)``. Returns (B, H, D) in q's dtype; a row with length 0 gets zeros. Scores and softmax in
    float32 (``scores * scale``, max-subtracted). Lengths outside ``[0, S_max]`` are clamped to it (the kernel must
    never read past the cache; checking on the host would need a sync). ``window`` (sliding-window layers): the
    query, at position p = lengths[b] - 1, attends only keys k with p - window < k <= p (transformers'
    ``sliding_window_overlay``); the keys before the window may hold garbage too and are never read.

``rope_store_(q, k, v, cos, sin, positions, k_cache, v_cache)``
    q (B, H, D), k, v (B, Hkv, D) for the new token (any strides, e.g. views of a fused qkv output); cos, sin (B, D)
    rows of the rotary table (HF layout, ``cat(freqs, freqs)``); positions (B,) integer. Rotates q in place and
    writes the rotated k and the v to ``k_cache[b, :, positions[b]]`` / ``v_cache[b, :, positions[b]]``; rows with
    ``positions[b] < 0`` (inactive) or ``>= S_max`` write nothing.

Rounding of ``rope_store_`` compared with transformers' ``apply_rotary_pos_emb`` on bf16/fp16 tensors: transformers
rounds cos/sin to the model dtype, then rounds ``q * cos`` and ``rotate_half(q) * sin`` to it and rounds their sum
(four roundings); here cos/sin stay float32 and ``x * cos + rotate_half(x) * sin`` is computed in float32 and
rounded once to the destination dtype (q's dtype for q, the cache's for k and v). The result is the correctly
rounded value of the float32 formula, within ~2 ulps of transformers' (tests check it with conftest's TOLERANCE).

Each op has a reference (plain PyTorch, float32 math, also graph safe) and a dispatcher that runs the Triton
kernels in ``kernels/triton/decode_attention.py`` when ``triton_usable`` (and the dtype/size allow), else the
reference. Triton is imported only when a kernel runs.
"""

from __future__ import annotations

import torch

from lorakit.errors import LorakitError
from lorakit.kernels._triton import interpreter_on, triton_usable

MAX_KERNEL_HEAD_DIM = 256  # one head row must fit one Triton block
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- checks (host-side shape/dtype only: never reads device values) ---------------------------------------------

def _check_rows(name: str, rows, b: int, device) -> None:
    if rows is None:
        return
    if not isinstance(rows, torch.Tensor) or rows.shape != (b,) or rows.dtype not in (torch.int32, torch.int64) \
            or rows.device != device:
        got = f"{tuple(rows.shape)} {rows.dtype} on {rows.device}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise LorakitError(f"{name}: rows must be a ({b},) int32/int64 tensor on {device} (the cache row of each q row), got {got}")


def _check_decode_attention(q, k_cache, v_cache, lengths, rows=None) -> None:
    if q.dim() != 3:
        raise LorakitError(f"decode_attention: q must be (batch, heads, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise LorakitError(f"decode_attention: k_cache and v_cache must both be (batch, kv_heads, max_len, head_dim), "
                           f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    b, h, d = q.shape
    cb, hkv, _, cd = k_cache.shape
    if cb != b and rows is None:
        raise LorakitError(f"decode_attention: q has batch {b} but the cache has batch {cb}; pass one cache row per q row "
                           "(or rows=, the cache row of each q row)")
    _check_rows("decode_attention", rows, b, q.device)
    if cd != d:
        raise LorakitError(f"decode_attention: q head_dim {d} != cache head_dim {cd}")
    if hkv == 0 or h % hkv:
        raise LorakitError(f"decode_attention: q heads {h} must be a multiple of the cache's kv heads {hkv}")
    if k_cache.dtype != v_cache.dtype or q.dtype != k_cache.dtype:
        raise LorakitError(f"decode_attention: q, k_cache, v_cache must share one dtype, got {q.dtype}, "
                           f"{k_cache.dtype}, {v_cache.dtype}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (b,) or lengths.dtype not in (torch.int32, torch.int64):
        got = f"{tuple(lengths.shape)} {lengths.dtype}" if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise LorakitError(f"decode_attention: lengths must be a ({b},) int32 tensor (one length per row), got {got}")
    if lengths.device != q.device or k_cache.device != q.device or v_cache.device != q.device:
        raise LorakitError(f"decode_attention: q, caches and lengths must be on one device, got q on {q.device}, "
                           f"k_cache on {k_cache.device}, v_cache on {v_cache.device}, lengths on {lengths.device}")


def _check_rope_store(q, k, v, cos, sin, positions, k_cache, v_cache, rows=None) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise LorakitError(f"rope_store_: q, k, v must be (batch, heads, head_dim), got {tuple(q.shape)}, "
                           f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != d:
        raise LorakitError(f"rope_store_: k and v must be ({b}, kv_heads, {d}) like q (batch {b}, head_dim {d}), "
                           f"got {tuple(k.shape)} and {tuple(v.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or h % hkv:
        raise LorakitError(f"rope_store_: q heads {h} must be a multiple of k/v heads {hkv}")
    if d % 2:
        raise LorakitError(f"rope_store_: head_dim must be even for rotate_half, got {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (b, d) or not t.is_floating_point():
            raise LorakitError(f"rope_store_: {name} must be a ({b}, {d}) float tensor (the rotary row of each "
                               f"position), got {tuple(t.shape)} {t.dtype}")
    if positions.shape != (b,) or positions.dtype not in (torch.int32, torch.int64):
        raise LorakitError(f"rope_store_: positions must be a ({b},) int32/int64 tensor (cache index per row), got "
                           f"{tuple(positions.shape)} {positions.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or (k_cache.shape[0] != b and rows is None) \
            or k_cache.shape[1] != hkv or k_cache.shape[3] != d:
        raise LorakitError(f"rope_store_: k_cache and v_cache must both be ({b if rows is None else 'rows'}, {hkv}, "
                           f"max_len, {d}), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _check_rows("rope_store_", rows, b, q.device)
    devices = {t.device for t in (q, k, v, cos, sin, positions, k_cache, v_cache)}
    if len(devices) != 1:
        raise LorakitError(f"rope_store_: all tensors must be on one device, got {sorted(str(x) for x in devices)}")


def _check_rope_lora(q, k, lora) -> tuple:
    """rope_store_'s ``lora`` tuple, checked (shapes only) and with contiguous scaling/rank."""
    part, B, scaling, rank, slots = lora
    b, h, d = q.shape
    n = (h + 2 * k.shape[1]) * d
    if B.dim() != 3 or B.shape[1] != n or part.dim() != 3 or part.shape[1:] != (b, 3 * B.shape[2]) \
            or scaling.shape != (B.shape[0], 3) or rank.shape != (B.shape[0], 3) or slots.shape != (b,):
        raise LorakitError(f"rope_store_'s lora must be (part (P, {b}, 3R), B (slots, {n}, R), scaling and rank "
                           f"(slots, 3), slot_of_row ({b},)), got {[tuple(t.shape) for t in lora]}")
    return part, B, scaling.contiguous(), rank.contiguous(), slots


def expand_qkv_lora(q, k, lora) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (dq, dk, dv) deltas of rope_store_'s ``lora`` (shapes of q, k, v), in q's dtype: one grouped expand
    (``grouped_expand_``: Triton when it can run) into a fused (B, (H + 2 Hkv) D) buffer."""
    from lorakit.kernels.grouped_lora import grouped_expand_

    part, B, scaling, rank, slots = lora
    b, h, d = q.shape
    nq, nkv = h * d, k.shape[1] * d
    flat = torch.empty(b, nq + 2 * nkv, dtype=q.dtype, device=q.device)
    grouped_expand_(flat, part, B, scaling, rank, slots, [nq, nkv, nkv], accumulate=False)
    heads = flat.view(b, h + 2 * k.shape[1], d)
    return heads[:, :h], heads[:, h:h + k.shape[1]], heads[:, h + k.shape[1]:]


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    if not triton_usable(*tensors):
        return False
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if not dtypes <= set(_KERNEL_DTYPES):
        return False
    return not (tensors[0].device.type == "cpu" and interpreter_on() and torch.bfloat16 in dtypes)  # no bf16 there


# -- decode attention ---------------------------------------------------------------------------------------------

def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                               scale: float, rows: torch.Tensor | None = None,
                               softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """q (B, H, D), caches (B, Hkv, S, D) (or (C, Hkv, S, D) with rows (B,): q row i reads cache row rows[i]; a row
    outside 0..C-1 attends nothing), lengths (B,) -> (B, H, D) in q's dtype; float32 math, graph safe. ``softcap``
    (Gemma 2): the scaled scores become ``softcap * tanh(scores / softcap)`` before the softmax, as transformers.
    ``window``: row b attends keys ``lengths[b] - window .. lengths[b] - 1`` only (a sliding-window layer)."""
    if rows is not None:
        inside = (rows >= 0) & (rows < k_cache.shape[0])
        index = torch.where(inside, rows, 0).to(torch.long)
        k_cache, v_cache = k_cache.index_select(0, index), v_cache.index_select(0, index)
        lengths = torch.where(inside, lengths, 0)
    b, h, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    g = h // hkv
    keys = torch.arange(s, device=q.device)[None, :]
    ends = lengths[:, None].to(torch.long)
    valid = keys < ends  # (B, S)
    if window is not None:  # the query at p = length - 1 sees p - window < k <= p
        valid &= keys >= ends - int(window)
    qf = q.float().reshape(b, hkv, g, d)
    scores = torch.einsum("bkgd,bksd->bkgs", qf, k_cache.float()) * scale  # (B, Hkv, G, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = torch.where(valid[:, None, None, :], scores, float("-inf"))  # where, not masked_fill*: NaN keys vanish
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)  # length 0: all -inf, keep exp() at 0, not NaN
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    v = torch.where(valid[:, None, :, None], v_cache.float(), 0.0)  # 0 * NaN would be NaN: zero the garbage first
    out = torch.einsum("bkgs,bksd->bkgd", p, v) / torch.where(denom > 0, denom, 1.0)
    return out.reshape(b, h, d).to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float, *, splits: int | None = None, rows: torch.Tensor | None = None,
                     softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of one new token per row over a static cache: q (B, H, D) -> (B, H, D) in q's dtype.

    Flash-decoding (``kernels/triton/decode_attention.py``) when Triton can run, else the reference. ``splits``
    forces the number of key-range splits per (row, kv head) (tests; benchmarks); by default it is chosen from the
    shapes and the GPU's SM count, never from ``lengths``. ``rows`` (B,): the cache row each q row reads (default:
    its own), so the tokens of a prefilled prompt, each with its own length, attend their one row (a row outside
    the cache attends nothing and gives zeros). ``softcap`` (Gemma 2's attention logit soft-capping, > 0): scores
    ``s * scale`` become ``softcap * tanh(s * scale / softcap)`` before the softmax. ``window`` (a sliding-window
    layer, int >= 1): each row attends only its last ``window`` keys, ``max(0, length - window) .. length - 1``
    (the query at p = length - 1 sees p - window < k <= p, transformers' mask); the kernel reads none of the keys
    before them and splits the window, not the cache. A window of at least S_max changes nothing.
    """
    _check_decode_attention(q, k_cache, v_cache, lengths, rows)
    if splits is not None and (not isinstance(splits, int) or splits < 1):
        raise LorakitError(f"decode_attention: splits must be a positive int, got {splits!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise LorakitError(f"decode_attention: softcap must be None or a positive number, got {softcap!r}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise LorakitError(f"decode_attention: window must be None or an int >= 1 (keys a query attends), "
                               f"got {window!r}")
        if window >= k_cache.shape[2]:
            window = None  # no row holds more keys than the cache: the window never applies
    extra = () if rows is None else (rows,)
    if q.shape[-1] <= MAX_KERNEL_HEAD_DIM and q.numel() and _kernel_ok(q, k_cache, v_cache, lengths, *extra):
        from lorakit.kernels.triton.decode_attention import flash_decode

        if window is not None:
            return flash_decode(q, k_cache, v_cache, lengths, float(scale), splits, rows,
                                None if softcap is None else float(softcap), window)
        if softcap is None:
            return flash_decode(q, k_cache, v_cache, lengths, float(scale), splits, rows)
        return flash_decode(q, k_cache, v_cache, lengths, float(scale), splits, rows, float(softcap))
    return decode_attention_reference(q, k_cache, v_cache, lengths, scale, rows, softcap, window)


# -- rotary embedding + cache store ---------------------------------------------------------------------------------

def rotate_half_float(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, D), cos/sin (B, D) float32 -> x * cos + rotate_half(x) * sin in float32 (HF convention)."""
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_store_reference_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          rows: torch.Tensor | None = None) -> None:
    """In place: q <- rope(q); k_cache[r, :, positions[b]] <- rope(k[b]), v_cache[...] <- v[b] for active rows b,
    with r = b (or rows[b]).

    Graph safe without ``rows``: inactive rows write back the value already in the cache (a gather + where +
    scatter, no sync). With ``rows`` several q rows share a cache row, so inactive ones could collide with active
    ones: only the active are scattered (selected on the host: a sync).
    """
    cos, sin = cos.float(), sin.float()
    q.copy_(rotate_half_float(q, cos, sin).to(q.dtype))
    s = k_cache.shape[2]
    pos = positions.to(torch.long)
    k_new = rotate_half_float(k, cos, sin).to(k_cache.dtype)
    if rows is not None:
        keep = ((pos >= 0) & (pos < s) & (rows >= 0) & (rows < k_cache.shape[0])).nonzero().squeeze(1)
        where = (rows.to(torch.long).index_select(0, keep), slice(None), pos.index_select(0, keep))
        k_cache[where] = k_new.index_select(0, keep)
        v_cache[where] = v.to(v_cache.dtype).index_select(0, keep)
        return
    active = ((pos >= 0) & (pos < s))[:, None, None]  # (B, 1, 1)
    rows = torch.arange(q.shape[0], device=q.device)
    idx = pos.clamp(0, s - 1)
    # advanced indices split by a slice: the (B,) dims come first, so both sides are (B, Hkv, D)
    k_cache[rows, :, idx] = torch.where(active, k_new, k_cache[rows, :, idx])
    v_cache[rows, :, idx] = torch.where(active, v.to(v_cache.dtype), v_cache[rows, :, idx])


def rope_store_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                delta: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                rows: torch.Tensor | None = None, lora: tuple | None = None) -> None:
    """Rotate q in place and store rotated k and v at ``positions`` in the caches; one Triton kernel when it can.

    q (B, H, D), k, v (B, Hkv, D): any strides (views of a fused qkv output); cos, sin (B, D) float32;
    positions (B,) int32/int64 (< 0: the row writes nothing); caches (B, Hkv, S_max, D).
    delta: None, or (dq, dk, dv) of q's, k's and v's shapes, added to them first (rounded to their dtype, as
    ``q + dq`` would be): the static decoder's LoRA deltas, computed beside the GEMM, read in the same pass. q ends
    up holding rope(q + dq); k and v themselves are not changed.
    rows: None, or (B,) the cache row of each q row (the tokens of a prefilled prompt share one; the caches may then
    hold any number of rows; a row outside them stores nothing).
    lora: None, or the q/k/v LoRA to add first, still to be expanded: (part, B_qkv, scaling, rank, slot_of_row) with
    part (P, B, 3R) float32 the grouped shrink's planes (``grouped_shrink``) and the rest the q/k/v
    ``GroupStack``'s B ((slots, (H + 2 Hkv) D, R)), scaling and rank ((slots, 3)) and each row's slot ((B,), -1:
    none). The kernel then expands them itself (the decoder's fused q/k/v expand); the deltas are rounded to q's
    dtype as a stored delta would be. Not with ``delta``.
    """
    _check_rope_store(q, k, v, cos, sin, positions, k_cache, v_cache, rows)
    if lora is not None:
        if delta is not None:
            raise LorakitError("rope_store_ takes a stored delta or a LoRA to expand, not both")
        lora = _check_rope_lora(q, k, lora)
        if q.numel() and q.shape[-1] <= MAX_KERNEL_HEAD_DIM and \
                _kernel_ok(q, k, v, cos.float(), sin.float(), positions, k_cache, v_cache, *lora,
                           *(() if rows is None else (rows,))):
            from lorakit.kernels.triton.decode_attention import rope_store_kernel_

            rope_store_kernel_(q, k, v, cos.float(), sin.float(), positions, k_cache, v_cache, None, rows, lora)
            return
        delta = expand_qkv_lora(q, k, lora)
    if delta is not None:
        if len(delta) != 3 or any(d.shape != t.shape for d, t in zip(delta, (q, k, v))):
            raise LorakitError(f"rope_store_'s delta must be (dq, dk, dv) shaped like q, k, v {tuple(q.shape)}, "
                               f"{tuple(k.shape)}, {tuple(v.shape)}")
    same_strides = delta is None or all(d.stride() == t.stride() and d.device == t.device for d, t in zip(delta, (q, k, v)))
    extra = (*(delta or ()), *(() if rows is None else (rows,)))
    if q.numel() and q.shape[-1] <= MAX_KERNEL_HEAD_DIM and same_strides and \
            _kernel_ok(q, k, v, cos.float(), sin.float(), positions, k_cache, v_cache, *extra):
        from lorakit.kernels.triton.decode_attention import rope_store_kernel_

        rope_store_kernel_(q, k, v, cos.float(), sin.float(), positions, k_cache, v_cache, delta, rows)
        return
    if delta is not None:
        q.add_(delta[0].to(q.dtype))
        k, v = k + delta[1].to(k.dtype), v + delta[2].to(v.dtype)
    rope_store_reference_(q, k, v, cos, sin, positions, k_cache, v_cache, rows)
