"""Grouped multi-LoRA (several projections sharing one input, rows indexed by a slot table): the Triton kernels
(TRITON_INTERPRET=1 on the CPU) against the reference and an independent float64 formula, on awkward shapes with
NaN padding, rows without adapter, strided outputs and forced split-K; grouped_stack; one-line errors."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from lorakit.errors import LorakitError
from lorakit.kernels._triton import triton_usable
from lorakit.kernels.grouped_lora import grouped_lora_add_, grouped_lora_add_reference, grouped_stack, grouped_stack_from
from lorakit.kernels.multi_lora import multi_lora_delta_reference
from lorakit.kernels.triton import grouped_lora as tg

DTYPES = [torch.float32, torch.float16]
RANK_CHOICES = (0, 3, 8, 16)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles smaller than the test shapes, so K splits into several chunks, column blocks straddle segments and an
    expand program loops over column blocks (its last ones partly or wholly past N)."""
    monkeypatch.setitem(tg.CONFIGS, "shrink", dict(tg.CONFIGS["shrink"], block_k=32))
    monkeypatch.setitem(tg.CONFIGS, "expand", dict(tg.CONFIGS["expand"], block_n=32, iters=2))  # and 2 blocks a program


def make_grouped(slots, K, splits, R, dtype, seed=0):
    """A (slots, G*R, K) and B (slots, N, R) with NaN in every padded row/column, mixed ranks 0/3/8/16 (capped at R)."""
    g = torch.Generator().manual_seed(seed)
    G, N = len(splits), sum(splits)
    rank = torch.tensor([[min(RANK_CHOICES[(s + 2 * j) % 4], R) for j in range(G)] for s in range(slots)], dtype=torch.int32)
    A = torch.full((slots, G * R, K), float("nan"))
    B = torch.full((slots, N, R), float("nan"))
    bounds = [0] + torch.tensor(splits).cumsum(0).tolist()
    for s in range(slots):
        for j in range(G):
            r = int(rank[s, j])
            A[s, j * R : j * R + r] = torch.randn(r, K, generator=g) / K**0.5
            B[s, bounds[j] : bounds[j + 1], :r] = torch.randn(splits[j], r, generator=g)
    scaling = torch.rand(slots, G, generator=g) + 0.5
    return A.to(dtype), B.to(dtype), scaling, rank


def float64_formula(y, x, A, B, scaling, rank, slot_of_row, splits):
    """Row by row, segment by segment, in float64: the truth (written independently of the reference)."""
    out = y.double().clone()
    R = A.shape[1] // len(splits)
    col = 0
    for j, n in enumerate(splits):
        for t, s in enumerate(slot_of_row.tolist()):
            r = int(rank[s, j]) if s >= 0 else 0
            if r:
                low = x[t].double() @ A[s, j * R : j * R + r].double().T
                out[t, col : col + n] += scaling[s, j].double() * (low @ B[s, col : col + n, :r].double().T)
        col += n
    return out


def strided_output(T, N, dtype, slot_of_row):
    """y as the (T, N) view at column 3 of a wider (T, N + 7) buffer (row stride N + 7, offset 3); rows without
    adapter and the columns outside the view hold NaN."""
    wide = torch.randn(T, N + 7).to(dtype)
    wide[:, :3] = float("nan")
    wide[:, 3 + N :] = float("nan")
    wide[slot_of_row < 0] = float("nan")
    return wide, wide[:, 3 : 3 + N]


CASES = {
    # name: (T, K, out_splits, slot_of_row)
    "one-row-qkv": (1, 72, [40, 24, 24], [2]),
    "five-rows-one-segment": (5, 130, [33], [0, -1, 3, 3, 1]),
    "nineteen-rows-gate-up": (19, 130, [50, 50], [(7 * i) % 9 - 1 for i in range(19)]),
}


def test_triton_path_is_taken_in_tests():
    assert triton_usable(torch.zeros(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("split_k", [None, 1, 2, 3])
def test_kernels_match_reference_and_float64(case, dtype, split_k):
    T, K, splits, rows = CASES[case]
    slots, R = 8, 16
    A, B, scaling, rank = make_grouped(slots, K, splits, R, dtype)
    slot_of_row = torch.tensor(rows, dtype=torch.int32)
    x = torch.randn(T, K).to(dtype)
    wide, y = strided_output(T, sum(splits), dtype, slot_of_row)
    before = wide.clone()
    truth = float64_formula(y, x, A, B, scaling, rank, slot_of_row, splits)
    ref = grouped_lora_add_reference(y.clone(), x, A, B, scaling, rank, slot_of_row, splits)
    out = grouped_lora_add_(y, x, A, B, scaling, rank, slot_of_row, splits, split_k=split_k)
    assert out.data_ptr() == y.data_ptr()  # in place
    active = slot_of_row >= 0
    assert_close(y[active], truth[active], msg="kernels vs float64 formula")
    assert_close(ref[active], truth[active], msg="reference vs float64 formula")
    assert_close(y[active], ref[active], msg="kernels vs reference")
    assert not torch.isnan(y[active]).any()  # NaN padding of A and B never leaks
    # rows without adapter and the columns beyond N: bit-identical, NaN sentinels included
    bits = torch.int16 if dtype == torch.float16 else torch.int32
    assert torch.equal(wide[~active].view(bits), before[~active].view(bits))
    outside = torch.ones(wide.shape[1], dtype=torch.bool)
    outside[3 : 3 + y.shape[1]] = False
    assert torch.equal(wide[:, outside].view(bits), before[:, outside].view(bits))
    if split_k is not None:  # the forced split is really used (K=130: 5 chunks of 32) unless K has fewer chunks
        block_k, used, _ = tg.shrink_blocks(T, K, A.shape[1], x.device, split_k)
        assert used == min(split_k, -(-K // block_k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_store_mode_writes_the_delta_and_zeros_rows_without_adapter(case, dtype):
    """accumulate=False: y = delta on every row (zeros where slot is -1), whatever y held (NaN here), columns
    outside the view untouched; kernels and reference agree with the float64 formula on a zero output."""
    T, K, splits, rows = CASES[case]
    A, B, scaling, rank = make_grouped(8, K, splits, 16, dtype, seed=1)
    slot_of_row = torch.tensor(rows, dtype=torch.int32)
    x = torch.randn(T, K).to(dtype)
    wide, y = strided_output(T, sum(splits), dtype, slot_of_row)
    y.fill_(float("nan"))
    before = wide.clone()
    truth = float64_formula(torch.zeros(y.shape), x, A, B, scaling, rank, slot_of_row, splits)
    ref = grouped_lora_add_reference(y.clone(), x, A, B, scaling, rank, slot_of_row, splits, accumulate=False)
    grouped_lora_add_(y, x, A, B, scaling, rank, slot_of_row, splits, accumulate=False)
    assert_close(y, truth, msg="store-mode kernels vs float64 formula")
    assert_close(ref, truth, msg="store-mode reference vs float64 formula")
    assert torch.equal(y[slot_of_row < 0], torch.zeros_like(y[slot_of_row < 0]))
    bits = torch.int16 if dtype == torch.float16 else torch.int32
    outside = torch.ones(wide.shape[1], dtype=torch.bool)
    outside[3 : 3 + y.shape[1]] = False
    assert torch.equal(wide[:, outside].view(bits), before[:, outside].view(bits))


def test_split_planes_cover_k_without_empty_splits():
    for K in (16, 72, 130, 1000):
        for split in range(1, 12):
            block_k, used, per = tg.shrink_blocks(3, K, 48, torch.device("cpu"), split)
            assert (used - 1) * per < K <= used * per  # every split has work, together they cover K


def test_single_segment_agrees_with_multi_lora_reference():
    T, K, N, slots = 7, 72, 45, 5
    A, B, scaling, rank = make_grouped(slots, K, [N], 16, torch.float32)
    A, B = A.nan_to_num(0.0), B.nan_to_num(0.0)  # multi_lora's reference with ranks also slices, zeros are safe
    slot_of_row = torch.tensor([4, -1, 0, 2, 2, 1, 3], dtype=torch.int32)
    x, y = torch.randn(T, K), torch.randn(T, N)
    expected = y + multi_lora_delta_reference(x, A, B, scaling[:, 0], slot_of_row, rank[:, 0])
    assert_close(grouped_lora_add_(y.clone(), x, A, B, scaling, rank, slot_of_row, [N]), expected)
    assert_close(grouped_lora_add_reference(y.clone(), x, A, B, scaling, rank, slot_of_row, [N]), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_and_output_dtypes_may_differ_from_the_adapters(dtype):
    T, K, splits = 6, 72, [20, 12]
    A, B, scaling, rank = make_grouped(4, K, splits, 12, dtype)  # R not a power of two
    slot_of_row = torch.tensor([0, 1, 2, 3, 1, -1], dtype=torch.int32)
    x, y = torch.randn(T, K), torch.randn(T, sum(splits))  # float32 activations, dtype adapters
    truth = float64_formula(y, x.to(dtype), A, B, scaling, rank, slot_of_row, splits)  # x rounded to A's dtype
    out = grouped_lora_add_(y.clone(), x, A, B, scaling, rank, slot_of_row, splits)
    assert out.dtype == torch.float32
    assert_close(out, truth, dtype=dtype)


@pytest.mark.filterwarnings("ignore:invalid value")  # the interpreter computes inf * 0 in the masked lanes
def test_inf_input_does_not_reach_a_segment_without_adapter():
    K, splits = 72, [16, 16]
    A, B, scaling, rank = make_grouped(2, K, splits, 16, torch.float32)
    rank[1] = torch.tensor([0, 8], dtype=torch.int32)
    A[1, 8:16], B[1, 16:, 8:] = float("nan"), float("nan")
    x = torch.randn(1, K)
    x[0, 5] = float("inf")
    y = torch.randn(1, 32)
    out = grouped_lora_add_(y.clone(), x, A, B, scaling, rank, torch.tensor([1], dtype=torch.int32), splits)
    assert torch.equal(out[:, :16], y[:, :16])  # rank 0: untouched, not inf * 0 = NaN


def test_triton_path_treats_an_out_of_range_slot_as_no_adapter_and_reference_refuses():
    A, B, scaling, rank = make_grouped(3, 72, [24], 16, torch.float32)
    x, y = torch.randn(2, 72), torch.randn(2, 24)
    slot_of_row = torch.tensor([3, 1], dtype=torch.int32)  # slot 1 has rank 3
    out = grouped_lora_add_(y.clone(), x, A, B, scaling, rank, slot_of_row, [24])
    assert torch.equal(out[0], y[0]) and not torch.equal(out[1], y[1])
    with pytest.raises(LorakitError, match="valid slots are -1"):
        grouped_lora_add_reference(y.clone(), x, A, B, scaling, rank, slot_of_row, [24])


def test_disable_triton_runs_the_reference(monkeypatch):
    import lorakit.kernels.grouped_lora as gl

    calls = []
    monkeypatch.setattr(gl, "grouped_lora_add_reference", lambda *a, **k: calls.append(1) or a[0])
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")
    A, B, scaling, rank = make_grouped(2, 16, [8], 4, torch.float32)
    gl.grouped_lora_add_(torch.zeros(1, 8), torch.zeros(1, 16), A, B, scaling, rank, torch.zeros(1, dtype=torch.int32), [8])
    assert calls == [1]


def test_grouped_stack_from_per_projection_stacks_equals_separate_projections():
    slots, K = 4, 40
    outs, r_of = [24, 8, 8], [16, 8, 16]  # projections may have different r_max: padded to the largest
    As, Bs, scalings, ranks = [], [], [], []
    for n, r in zip(outs, r_of):
        As.append(torch.randn(slots, r, K))
        Bs.append(torch.randn(slots, n, r))
        scalings.append(torch.rand(slots))
        ranks.append(torch.randint(0, r + 1, (slots,), dtype=torch.int32))
    A, B, scaling, rank = grouped_stack(As, Bs, scalings, ranks)
    assert A.shape == (slots, 48, K) and B.shape == (slots, 40, 16) and scaling.shape == rank.shape == (slots, 3)
    slot_of_row = torch.tensor([3, 0, -1, 1, 2], dtype=torch.int32)
    x, y = torch.randn(5, K), torch.randn(5, 40)
    expected = y + torch.cat([multi_lora_delta_reference(x, a, b, s, slot_of_row, r)
                              for a, b, s, r in zip(As, Bs, scalings, ranks)], dim=1)
    assert_close(grouped_lora_add_(y.clone(), x, A, B, scaling, rank, slot_of_row, outs), expected)
    # in place into existing buffers (what a captured graph reads), from LayerStack-like objects
    layers = [type("L", (), dict(lora_A=a, lora_B=b, scaling=s, rank=r))() for a, b, s, r in zip(As, Bs, scalings, ranks)]
    buffers = tuple(torch.full_like(t, 7) for t in (A, B, scaling, rank))
    *again, splits = grouped_stack_from(layers, out=buffers)
    assert splits == outs and all(u is v for u, v in zip(again, buffers))
    assert all(torch.equal(u, v) for u, v in zip(again, (A, B, scaling, rank)))


def _args(T=3, K=16, splits=(8, 4), R=4, slots=2):
    G, N = len(splits), sum(splits)
    return dict(y=torch.zeros(T, N), x=torch.zeros(T, K), A=torch.zeros(slots, G * R, K), B=torch.zeros(slots, N, R),
                scaling=torch.zeros(slots, G), rank=torch.zeros(slots, G, dtype=torch.int32),
                slot_of_row=torch.zeros(T, dtype=torch.int32), out_splits=list(splits))


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.zeros(3, 15)), "A must be"),
    (dict(y=torch.zeros(3, 13)), "y must have shape"),
    (dict(y=torch.zeros(12, 3).t()), "unit column stride"),
    (dict(A=torch.zeros(2, 7, 16)), "A must be"),
    (dict(B=torch.zeros(2, 12, 5)), "B must be"),
    (dict(scaling=torch.zeros(2)), "scaling and rank"),
    (dict(rank=torch.zeros(2, 3, dtype=torch.int32)), "scaling and rank"),
    (dict(slot_of_row=torch.zeros(4, dtype=torch.int32)), "slot_of_row must have shape"),
    (dict(slot_of_row=torch.zeros(3)), "integer tensors"),
    (dict(out_splits=[]), "out_splits must list"),
    (dict(out_splits=[4, 4, 2, 1, 1]), "out_splits must list"),
    (dict(x=torch.zeros(3, 16, dtype=torch.int32)), "floating-point"),
])
def test_shape_mistakes_raise_one_line_errors(change, message):
    args = {**_args(), **change}
    for fn in (grouped_lora_add_, grouped_lora_add_reference):
        with pytest.raises(LorakitError, match=message) as info:
            fn(**args)
        assert "\n" not in str(info.value)


def test_dispatcher_takes_16_and_32_bit_floats_only_and_the_reference_also_float64():
    args = {k: (v.double() if k in ("x", "y", "A", "B") else v) for k, v in _args().items()}
    with pytest.raises(LorakitError, match="float32/float16/bfloat16") as info:
        grouped_lora_add_(**args)
    assert "\n" not in str(info.value)
    assert grouped_lora_add_reference(**args).dtype == torch.float64


def test_grouped_stack_mistakes_raise_one_line_errors():
    a, b, s, r = torch.zeros(2, 4, 16), torch.zeros(2, 8, 4), torch.zeros(2), torch.zeros(2, dtype=torch.int32)
    for args, message in [(([a], [b, b], [s], [r]), "one A, B"), (([a, torch.zeros(2, 4, 15)], [b, b], [s, s], [r, r]), "do not fit"),
                          (([a], [torch.zeros(2, 8, 3)], [s], [r]), "do not fit"), (([a], [b], [torch.zeros(3)], [r]), "must both be")]:
        with pytest.raises(LorakitError, match=message) as info:
            grouped_stack(*args)
        assert "\n" not in str(info.value)
