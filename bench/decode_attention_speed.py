"""Decode attention over a static KV cache and the rotary + cache store, alone: lorakit's Triton kernels vs the
PyTorch references vs torch sdpa (the peer), in one run.

For the Llama-3.1-8B decode shape (B=64, H=32, Hkv=8, D=128, S_max=1024, lengths random in 400..600) and the
Llama-3.2-1B one (D=64), in bf16:
  0. checks, each judged against a truth (the reference formula on float32 copies): the Triton output and the bf16
     reference's output, with garbage (NaN/inf) in every cache tail past the length; the kernel passes when it is
     finite, within conftest's bf16 tolerance of the truth, and its error is within 2x the bf16 reference's own
     error (+1e-3). rope_store_ likewise, on q/k/v views of a fused qkv buffer, one inactive row;
  1. copy bandwidth (a 1 GiB device-to-device copy, bytes read + written over the time; the method of
     bench/multi_adapter.py);
  2. GPU time per call from a CUDA graph of 10 calls (median of the replays): Triton decode_attention (the default
     split count, then a sweep of forced ones), the reference, sdpa with the kv heads expanded (repeat_interleave,
     what transformers' repeat_kv does) and sdpa with ``enable_gqa=True``; GB/s counts only the valid K/V bytes
     (sum(lengths) x Hkv x D x 2 tensors x 2 bytes), so it is what a kernel that skips the tail can reach, and
     ``of_copy`` is that over the copy bandwidth. sdpa reads all S_max keys, so its GB/s on valid bytes is lower;
  3. rope_store_ (Triton) vs its reference, bytes = q read + written, k/v read, k/v written to the cache, cos/sin.

Usage (about 20 s on an H200):

    python bench/decode_attention_speed.py
    TRITON_INTERPRET=1 python bench/decode_attention_speed.py --device cpu --tiny   # smoke test of the script

Writes ``$OUT/decode_attention_speed.json`` (or bench/results/ when $OUT is unset): {"checks": [...], "rows": [...]}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile

import torch

from bench_common import copy_bandwidth, graph_seconds  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from lorakit.kernels.decode_attention import (decode_attention, decode_attention_reference,  # noqa: E402
                                              rope_store_, rope_store_reference_)

SHAPES = {
    "8b": dict(batch=64, heads=32, kv_heads=8, head_dim=128, s_max=1024, lengths=(400, 600)),
    "1b": dict(batch=64, heads=32, kv_heads=8, head_dim=64, s_max=1024, lengths=(400, 600)),
    "tiny": dict(batch=3, heads=4, kv_heads=2, head_dim=64, s_max=80, lengths=(20, 70)),
}
BF16_TOLERANCE = (4e-2, 6e-2)  # tests/conftest.py TOLERANCE[torch.bfloat16]
CHECKS: list[dict] = []
ROWS: list[dict] = []


def log(*args):
    print(*args, flush=True)


# -- timing: the same method as bench/multi_adapter.py (copied so this script stands alone) ------------------------




# -- checks -------------------------------------------------------------------------------------------------------

def make_inputs(shape, device, dtype, garbage, ends=False):
    """q (B, H, D), caches (B, Hkv, S, D), lengths (B,) int32; ``ends``: row 0 empty, the last row full."""
    b, h, hkv, d, s = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["s_max"]
    lo, hi = shape["lengths"]
    lengths = torch.randint(lo, hi + 1, (b,), dtype=torch.int32, device=device)
    if ends:
        lengths[0], lengths[-1] = 0, s
    q = torch.randn(b, h, d, device=device).to(dtype)
    k = torch.randn(b, hkv, s, d, device=device).to(dtype)
    v = torch.randn(b, hkv, s, d, device=device).to(dtype)
    if garbage:  # the tail of a static cache holds anything: the kernel must never read it into the result
        tail = torch.arange(s, device=device)[None, :] >= lengths[:, None].long()  # (B, S)
        k.masked_fill_(tail[:, None, :, None], float("nan"))
        v.masked_fill_(tail[:, None, :, None], float("inf"))
    return q, k, v, lengths


def judge(name, fast, ref, truth, extra=None) -> bool:
    fast_err = (fast.float() - truth).abs().max().item()
    ref_err = (ref.float() - truth).abs().max().item()
    rtol, atol = BF16_TOLERANCE if fast.dtype == torch.bfloat16 else (1e-5, 1e-5)
    ok = bool(torch.isfinite(fast).all()) and torch.allclose(fast.float(), truth, rtol=rtol, atol=atol) \
        and fast_err <= 2 * ref_err + 1e-3
    log(f"CHECK {name}: max abs err fast {fast_err:.3e}, reference {ref_err:.3e} {'ok' if ok else 'MISMATCH'}")
    CHECKS.append(dict(check=name, fast_err=fast_err, reference_err=ref_err, ok=ok, **(extra or {})))
    return ok


def check_attention(name, shape, device, dtype) -> bool:
    q, k, v, lengths = make_inputs(shape, device, dtype, garbage=True, ends=True)  # row 0 must come out as zeros
    scale = 1 / math.sqrt(shape["head_dim"])
    truth = decode_attention_reference(q.float(), k.float(), v.float(), lengths, scale)
    ok = True
    for splits in (None, 1, 3):
        out = decode_attention(q, k, v, lengths, scale, splits=splits)
        ok &= judge(f"decode_attention {name} splits={splits or 'auto'}", out, decode_attention_reference(
            q, k, v, lengths, scale), truth, dict(shape=name, splits=splits))
        ok &= bool((out[0] == 0).all())
    return ok


def fused_qkv(shape, device, dtype):
    b, h, hkv, d = shape["batch"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    buf = torch.randn(b, (h + 2 * hkv) * d, device=device).to(dtype)  # what a fused qkv projection returns
    q = buf[:, :h * d].view(b, h, d)
    k = buf[:, h * d:(h + hkv) * d].view(b, hkv, d)
    v = buf[:, (h + hkv) * d:].view(b, hkv, d)
    return buf, q, k, v


def rope_rows(positions, d):
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d)
    emb = positions.clamp(min=0).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((emb, emb), dim=-1)
    return emb.cos(), emb.sin()


def check_rope(name, shape, device, dtype) -> bool:
    b, hkv, s, d = shape["batch"], shape["kv_heads"], shape["s_max"], shape["head_dim"]
    _, q, k, v = fused_qkv(shape, device, dtype)
    positions = torch.randint(0, s, (b,), device=device)
    positions[1] = -1  # an inactive row writes nothing
    cos, sin = rope_rows(positions, d)
    kc = torch.randn(b, hkv, s, d, device=device).to(dtype)
    vc = torch.randn(b, hkv, s, d, device=device).to(dtype)
    q_truth = q.clone().float()
    kc_truth, vc_truth = kc.float(), vc.float()
    rope_store_reference_(q_truth, k.float(), v.float(), cos, sin, positions, kc_truth, vc_truth)
    q_ref, kc_ref, vc_ref = q.clone(), kc.clone(), vc.clone()
    rope_store_reference_(q_ref, k, v, cos, sin, positions, kc_ref, vc_ref)
    kc_before = kc.clone()
    rope_store_(q, k, v, cos, sin, positions, kc, vc)
    ok = judge(f"rope_store_ q {name}", q, q_ref, q_truth) & judge(f"rope_store_ k_cache {name}", kc, kc_ref, kc_truth)
    same_v = bool(torch.equal(vc, vc_ref))
    untouched = bool(torch.equal(kc[1], kc_before[1]))
    log(f"CHECK rope_store_ {name}: v_cache equal to reference {same_v}, inactive row untouched {untouched}")
    CHECKS.append(dict(check=f"rope_store_ v/inactive {name}", ok=same_v and untouched))
    return ok and same_v and untouched


# -- timings ------------------------------------------------------------------------------------------------------

def sdpa_expanded(q, k, v, lengths, scale):
    """The peer as transformers runs it: kv heads repeated to the query heads, the full S_max cache, a mask."""
    g = q.shape[1] // k.shape[1]
    mask = (torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=mask, scale=scale)
    return out[:, :, 0]


def sdpa_gqa(q, k, v, lengths, scale):
    mask = (torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale,
                                                           enable_gqa=True)
    return out[:, :, 0]


def row(case, system, seconds, nbytes, copy_bw, **extra):
    gbs = nbytes / seconds / 1e9
    ROWS.append(dict(case=case, system=system, us=seconds * 1e6, gb_per_s=gbs, of_copy=gbs * 1e9 / copy_bw, **extra))
    log(f"  {case:<14} {system:<26} {seconds * 1e6:9.1f} us {gbs:8.1f} GB/s {gbs * 1e9 / copy_bw:6.1%} of copy")


def time_attention(name, shape, device, dtype, copy_bw, sweep, tiles=False):
    q, k, v, lengths = make_inputs(shape, device, dtype, garbage=False)  # finite everywhere: sdpa reads the tail
    scale = 1 / math.sqrt(shape["head_dim"])
    valid_bytes = int(lengths.sum()) * shape["kv_heads"] * shape["head_dim"] * 2 * k.element_size()
    peer_ok = torch.allclose(sdpa_expanded(q, k, v, lengths, scale).float(),
                             decode_attention_reference(q, k, v, lengths, scale).float(), rtol=4e-2, atol=6e-2)
    log(f"CHECK sdpa peer vs reference {name} (finite cache): {'ok' if peer_ok else 'MISMATCH'}")
    CHECKS.append(dict(check=f"sdpa peer vs reference {name}", ok=peer_ok))
    case = f"attn {name}"
    row(case, "lorakit triton (auto)", graph_seconds(lambda: decode_attention(q, k, v, lengths, scale), device),
        valid_bytes, copy_bw, splits=auto_splits(shape, device))
    for splits in sweep:
        row(case, f"lorakit triton splits={splits}", graph_seconds(
            lambda: decode_attention(q, k, v, lengths, scale, splits=splits), device), valid_bytes, copy_bw,
            splits=splits)
    if tiles and device.type == "cuda":  # the split kernel's tiles (splits as the default picks them)
        from lorakit.kernels.triton import decode_attention as kernel

        default = dict(kernel.TILES)
        for block_s, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)):
            kernel.TILES.update(block_s=block_s, num_warps=warps, num_stages=stages)
            try:
                err = (decode_attention(q, k, v, lengths, scale).float()
                       - decode_attention_reference(q, k, v, lengths, scale).float()).abs().max().item()
                seconds = graph_seconds(lambda: decode_attention(q, k, v, lengths, scale), device)
            except Exception as error:  # a tile that does not fit: say so, go on
                log(f"  tiles {block_s}/{warps}/{stages}: {type(error).__name__}")
                continue
            row(case, f"tiles block_s={block_s} warps={warps} stages={stages}", seconds, valid_bytes, copy_bw,
                tiles=[block_s, warps, stages], max_abs_diff_vs_reference=err)
        kernel.TILES.clear()
        kernel.TILES.update(default)
    row(case, "lorakit reference", graph_seconds(lambda: decode_attention_reference(q, k, v, lengths, scale), device),
        valid_bytes, copy_bw)
    if device.type == "cuda":  # the interpreter smoke run skips the peers (CPU sdpa is not the comparison)
        row(case, "sdpa repeat_kv (peer)", graph_seconds(lambda: sdpa_expanded(q, k, v, lengths, scale), device),
            valid_bytes, copy_bw)
        try:
            row(case, "sdpa enable_gqa (peer)", graph_seconds(lambda: sdpa_gqa(q, k, v, lengths, scale), device),
                valid_bytes, copy_bw)
        except Exception as e:  # older torch, or a backend that refuses the mask with enable_gqa
            log(f"  sdpa enable_gqa not timed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


def auto_splits(shape, device) -> int:
    from lorakit.kernels.triton.decode_attention import _blocks, choose_splits, split_plan

    sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    block_s = _blocks(shape["head_dim"], shape["heads"] // shape["kv_heads"])[1]
    return split_plan(shape["s_max"], choose_splits(shape["batch"], shape["kv_heads"], shape["s_max"], sm, block_s),
                      block_s)[0]


def time_rope(name, shape, device, dtype, copy_bw):
    b, h, hkv, s, d = shape["batch"], shape["heads"], shape["kv_heads"], shape["s_max"], shape["head_dim"]
    _, q, k, v = fused_qkv(shape, device, dtype)
    positions = torch.randint(0, s, (b,), device=device)
    cos, sin = rope_rows(positions, d)
    kc = torch.zeros(b, hkv, s, d, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    e = q.element_size()
    nbytes = b * d * (2 * h * e + 2 * hkv * e + 2 * hkv * e + 2 * 4)  # q r+w, k/v read, k/v written, cos/sin
    case = f"rope {name}"
    row(case, "lorakit triton", graph_seconds(lambda: rope_store_(q, k, v, cos, sin, positions, kc, vc), device),
        nbytes, copy_bw)
    row(case, "lorakit reference", graph_seconds(
        lambda: rope_store_reference_(q, k, v, cos, sin, positions, kc, vc), device), nbytes, copy_bw)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape (CPU smoke test under TRITON_INTERPRET=1)")
    parser.add_argument("--tiles", action="store_true", help="also sweep the split kernel's tiles (GPU only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter has no bf16
    torch.manual_seed(0)
    names = ["tiny"] if args.tiny else ["8b", "1b"]
    ok = True
    for name in names:
        ok &= check_attention(name, SHAPES[name], device, dtype)
        ok &= check_rope(name, SHAPES[name], device, dtype)
    copy_bw = copy_bandwidth(device)
    log(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)")
    sweep = (1, 2) if args.tiny else (1, 2, 4, 8, 16)
    log(f"  {'case':<14} {'system':<26} {'time':>12} {'valid-KV':>13} {'share':>14}")
    for name in names:
        time_attention(name, SHAPES[name], device, dtype, copy_bw, sweep, args.tiles)
        time_rope(name, SHAPES[name], device, dtype, copy_bw)
    ok &= all(c["ok"] for c in CHECKS)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "decode_attention_speed.json")
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", dtype=str(dtype),
                  torch=torch.__version__, copy_bandwidth_gb_s=copy_bw / 1e9, checks=CHECKS, rows=ROWS, all_ok=ok)
    with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".tmp", delete=False) as f:  # atomic write
        json.dump(result, f, indent=1)
    os.replace(f.name, path)
    log(f"{'ALL CHECKS OK' if ok else 'SOME CHECKS FAILED'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
