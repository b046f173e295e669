"""Multi-adapter LoRA: the Triton SGMV kernels (run on the CPU under TRITON_INTERPRET=1) against the reference,
the reference against a float64 per-row formula, and the mixed-batch fast path of a model against per-row runs."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, tiny_llama
from lorakit.errors import LorakitError
from lorakit.kernels._triton import triton_usable
from lorakit.kernels.multi_lora import (
    multi_lora_add_,
    multi_lora_delta,
    multi_lora_delta_reference,
    plan_rows,
    slot_of_row_from_plan,
)
from lorakit.kernels.triton.sgmv import sgmv_expand_add_, sgmv_shrink

DTYPES = [torch.float32, torch.float16]


def make_stack(d_in, d_out, ranks, dtype, r_max=None, garbage_padding=False):
    """A (slots, r_max, in), B (slots, out, r_max), scalings (slots,), ranks (slots,) int32."""
    r_max = r_max or max(max(ranks), 1)
    slots = len(ranks)
    fill = torch.randn if garbage_padding else torch.zeros
    A = fill(slots, r_max, d_in).to(dtype)
    B = fill(slots, d_out, r_max).to(dtype)
    for s, r in enumerate(ranks):
        A[s, :r] = (torch.randn(r, d_in) / d_in**0.5).to(dtype)
        B[s, :, :r] = torch.randn(d_out, r).to(dtype)
    scalings = torch.rand(slots) + 0.5
    return A, B, scalings, torch.tensor(ranks, dtype=torch.int32)


def per_row_float64(x, A, B, scalings, slot_of_row, ranks):
    """The formula, one row at a time, in float64: the truth the reference is checked against."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64)
    for i, s in enumerate(slot_of_row.tolist()):
        if s >= 0:
            r = int(ranks[s])
            out[i] = scalings[s].double() * (x[i].double() @ A[s, :r].double().T) @ B[s, :, :r].double().T
    return out


CASES = {
    # name: (T, in, out, ranks, slot_of_row builder)
    "odd-shapes-mixed-ranks-some-rows-without": (45, 37, 130, [4, 8, 16], lambda T, S: torch.randint(-1, S, (T,))),
    "all-rows-one-adapter-long-segment": (70, 37, 130, [8, 16], lambda T, S: torch.full((T,), 1)),
    "decode-every-row-different": (9, 37, 130, [4, 8, 16, 4, 8, 16, 4, 8, 16], lambda T, S: torch.randperm(S)),
    "no-row-has-an-adapter": (5, 37, 130, [4], lambda T, S: torch.full((T,), -1)),
}


def test_triton_path_is_taken_in_tests():
    # the comparisons below are only meaningful if the dispatcher really runs the kernels
    assert triton_usable(torch.zeros(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference(case, dtype):
    T, d_in, d_out, ranks, slots_fn = CASES[case]
    A, B, scalings, ranks_t = make_stack(d_in, d_out, ranks, dtype)
    x = torch.randn(T, d_in).to(dtype)
    slot_of_row = slots_fn(T, len(ranks))
    expected = multi_lora_delta_reference(x, A, B, scalings, slot_of_row, ranks_t)
    actual = multi_lora_delta(x, A, B, scalings, slot_of_row, ranks_t)
    assert actual.dtype == dtype and actual.shape == (T, d_out)
    assert_close(actual, expected)
    truth = per_row_float64(x, A, B, scalings, slot_of_row, ranks_t)
    assert_close(actual, truth)
    assert_close(expected, truth)
    no_adapter = slot_of_row < 0
    assert torch.equal(actual[no_adapter], torch.zeros_like(actual[no_adapter]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_shrink_matches_single_pass(dtype):
    # split-K (used for decode on the GPU) adds partial sums atomically; its result must match the one-pass kernel
    A, B, scalings, ranks = make_stack(300, 40, [4, 16, 8], dtype)
    x = torch.randn(6, 300).to(dtype)
    plan = plan_rows(torch.tensor([2, 0, -1, 1, 2, 0]))
    one = sgmv_shrink(x, A, scalings, ranks, plan, split_k=1)
    three = sgmv_shrink(x, A, scalings, ranks, plan, split_k=3)
    assert_close(three, one, dtype=torch.float32)
    y = torch.zeros(6, 40, dtype=dtype)
    sgmv_expand_add_(y, three, B, ranks, plan)
    assert_close(y, multi_lora_delta_reference(x, A, B, scalings, plan_slots(plan), ranks))


def plan_slots(plan):
    return slot_of_row_from_plan(plan)


def test_padded_rank_rows_contribute_exactly_zero():
    # garbage beyond each slot's rank must be ignored: the kernels mask the rank axis by ranks[slot]
    A, B, scalings, ranks = make_stack(37, 130, [4, 8, 16], torch.float32, garbage_padding=True)
    A_clean, B_clean = A.clone(), B.clone()
    for s, r in enumerate(ranks.tolist()):
        A_clean[s, r:] = 0
        B_clean[s, :, r:] = 0
    x = torch.randn(20, 37)
    slot_of_row = torch.randint(0, 3, (20,))
    with_garbage = multi_lora_delta(x, A, B, scalings, slot_of_row, ranks)
    clean = multi_lora_delta(x, A_clean, B_clean, scalings, slot_of_row, ranks)
    assert torch.equal(with_garbage, clean)


def test_rows_without_adapter_are_never_read_or_written():
    A, B, scalings, ranks = make_stack(37, 130, [4, 8], torch.float32)
    x = torch.randn(12, 37)
    slot_of_row = torch.tensor([0, -1, 1, -1, 0, 0, -1, 1, 1, -1, 0, -1])
    x[slot_of_row < 0] = float("nan")  # a read of these rows would spread NaN
    y = torch.randn(12, 130)
    y[slot_of_row < 0] = float("inf")  # a write would turn inf into NaN or change it
    before = y.clone()
    plan = plan_rows(slot_of_row)
    assert plan.row_order.numel() == int((slot_of_row >= 0).sum())
    multi_lora_add_(y, x, A, B, scalings, ranks, plan)
    assert torch.equal(y[slot_of_row < 0], before[slot_of_row < 0])
    x_clean = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    expected = before[slot_of_row >= 0] + multi_lora_delta_reference(x_clean, A, B, scalings, slot_of_row, ranks)[slot_of_row >= 0]
    assert_close(y[slot_of_row >= 0], expected)


def test_plan_groups_rows_by_slot_in_tiles_of_one_slot():
    slot_of_row = torch.tensor([3, 1, -1, 3, 1, 1] + [2] * 40)
    plan = plan_rows(slot_of_row)
    order, (start, end, slot) = plan.row_order.tolist(), plan.tiles.tolist()
    assert plan.block_m == 64 and plan.max_segment == 40  # a long segment: prefill tiles
    assert order[:3] == [1, 4, 5] and order[-2:] == [0, 3]  # stable inside each slot
    for s, e, sl in zip(start, end, slot):
        rows = order[s : min(e, s + plan.block_m)]
        assert {int(slot_of_row[r]) for r in rows} == {sl}
    assert torch.equal(slot_of_row_from_plan(plan), slot_of_row)
    decode = plan_rows(torch.arange(8))
    assert decode.block_m == 16 and decode.n_tiles == 8


def test_reference_gradients_match_float64_formula():
    # training through a mixed batch goes through the reference: its gradients must be right
    A, B, scalings, ranks = make_stack(37, 13, [4, 8], torch.float64)
    x = torch.randn(10, 37, dtype=torch.float64, requires_grad=True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    slot_of_row = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1, 0])
    weight = torch.randn(10, 13, dtype=torch.float64)
    (multi_lora_delta(x, A, B, scalings, slot_of_row, ranks) * weight).sum().backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    (per_row_float64_autograd(x, A, B, scalings, slot_of_row, ranks) * weight).sum().backward()
    for got, want in zip(grads, (x.grad, A.grad, B.grad)):
        assert_close(got, want)
    assert grads[1][0, 4:].abs().sum() == 0  # padded rows of a rank-4 slot get no gradient


def per_row_float64_autograd(x, A, B, scalings, slot_of_row, ranks):
    rows = []
    for i, s in enumerate(slot_of_row.tolist()):
        if s < 0:
            rows.append(torch.zeros(B.shape[1], dtype=x.dtype))
        else:
            r = int(ranks[s])
            rows.append(scalings[s].to(x.dtype) * (x[i] @ A[s, :r].T) @ B[s, :, :r].T)
    return torch.stack(rows)


def test_dispatcher_uses_reference_when_gradients_are_needed():
    A, B, scalings, ranks = make_stack(37, 13, [4], torch.float32)
    x = torch.randn(3, 37, requires_grad=True)
    out = multi_lora_delta(x, A, B, scalings, torch.tensor([0, -1, 0]), ranks)
    assert out.requires_grad  # the kernels have no backward; the reference keeps the graph
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad[1], torch.zeros(37))


def test_shape_mistakes_raise_one_line_errors():
    A, B, scalings, ranks = make_stack(37, 13, [4, 8], torch.float32)
    with pytest.raises(LorakitError, match="in_features=37"):
        multi_lora_delta(torch.randn(3, 36), A, B, scalings, torch.zeros(3, dtype=torch.long), ranks)
    with pytest.raises(LorakitError, match="one slot per row"):
        multi_lora_delta(torch.randn(3, 37), A, B, scalings, torch.zeros(4, dtype=torch.long), ranks)
    with pytest.raises(LorakitError, match="stack has 2 slots"):
        multi_lora_delta(torch.randn(3, 37), A, B, scalings, torch.tensor([0, 2, 1]), ranks)
    with pytest.raises(LorakitError, match="row plan covers"):
        multi_lora_add_(torch.zeros(3, 13), torch.randn(3, 37), A, B, scalings, ranks, plan_rows([0, 1]))


# -- the mixed batch of a model through the stacked kernels ------------------------------------------------------

def llama_with_adapters(dtype=torch.float32, dora=False):
    """Tiny llama with adapters of ranks 4, 8, 16 (random B, so every adapter changes the output)."""
    import lorakit

    model = tiny_llama().to(dtype)
    specs = [("r4", 4, "lora"), ("r8", 8, "rslora"), ("r16", 16, "lora")] + ([("dora", 4, "dora")] if dora else [])
    for name, r, variant in specs:
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2.0 * r, variant=variant), adapter=name)
    with torch.no_grad():
        for name, parameter in lorakit.lora_parameters(model):
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.2)
    return model


def per_row_logits(model, ids, names):
    import lorakit

    rows = []
    for i, name in enumerate(names):
        if name is None:
            with lorakit.disable_adapters(model):
                rows.append(model(ids[i : i + 1]).logits)
        else:
            lorakit.set_adapter(model, name)
            rows.append(model(ids[i : i + 1]).logits)
    return torch.cat(rows)


class KernelCalls:
    def __init__(self, monkeypatch):
        import lorakit.kernels.triton.sgmv as sgmv

        self.count = 0
        original = sgmv.sgmv_shrink

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(sgmv, "sgmv_shrink", counted)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_batch_fast_path_equals_per_row_runs(dtype, monkeypatch):
    import lorakit

    model = llama_with_adapters(dtype)
    names = ["r16", None, "r4", "r8", "r4", "r16"]
    ids = torch.randint(0, 128, (len(names), 7))
    calls = KernelCalls(monkeypatch)
    with torch.no_grad():
        with lorakit.mixed_batch(model, names):
            fast = model(ids).logits
        assert calls.count == 2 * 7  # every linear layer of both blocks went through the kernels
        expected = per_row_logits(model, ids, names)
        monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")
        with lorakit.mixed_batch(model, names):
            reference = model(ids).logits
    assert calls.count == 2 * 7  # the reference run did not use them
    assert_close(fast, expected)
    assert_close(fast, reference)
    assert (fast[0] - fast[1]).abs().max() > 0.01  # the adapters do change the output


def test_mixed_batch_decode_with_cache_through_fast_path(monkeypatch):
    import lorakit

    model = llama_with_adapters()
    names = ["r8", "r4", None, "r16"]
    ids = torch.randint(0, 128, (4, 6))
    calls = KernelCalls(monkeypatch)
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        out = model(ids[:, :5], use_cache=True)
        step = model(ids[:, 5:], past_key_values=out.past_key_values).logits  # one token per request
    assert calls.count == 2 * 2 * 7
    with torch.no_grad():
        expected = per_row_logits(model, ids, names)[:, 5:]
    assert_close(step, expected)


def test_mixed_batch_with_dora_uses_reference_and_stays_correct(monkeypatch):
    import lorakit

    model = llama_with_adapters(dora=True)
    names = ["dora", "r4", None]
    ids = torch.randint(0, 128, (3, 5))
    calls = KernelCalls(monkeypatch)
    with torch.no_grad():
        with lorakit.mixed_batch(model, names):
            mixed = model(ids).logits
        assert calls.count == 0
        with lorakit.mixed_batch(model, ["r4", "r8", None]):  # no DoRA in this batch: the kernels again
            model(ids)
        assert calls.count == 2 * 7
        assert_close(mixed, per_row_logits(model, ids, names))


def test_mixed_batch_follows_adapter_updates_and_deletes(monkeypatch):
    import lorakit

    model = llama_with_adapters()
    names = ["r4", "r8", "r16"]
    ids = torch.randint(0, 128, (3, 5))
    with torch.no_grad():
        with lorakit.mixed_batch(model, names):
            model(ids)  # fills the stacks
        for name, parameter in lorakit.lora_parameters(model, "r8"):
            if name.endswith("lora_B"):
                parameter.mul_(-2.0)  # in place, as an optimizer step would
        lorakit.delete_adapter(model, "r16")
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=4.0, init="gaussian"), adapter="r16")
        for name, parameter in lorakit.lora_parameters(model, "r16"):
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.2)
        with lorakit.mixed_batch(model, names):
            fast = model(ids).logits
        assert_close(fast, per_row_logits(model, ids, names))


def test_mixed_batch_with_gradients_uses_reference(monkeypatch):
    import lorakit

    model = llama_with_adapters()
    calls = KernelCalls(monkeypatch)
    ids = torch.randint(0, 128, (2, 5))
    with lorakit.mixed_batch(model, ["r4", "r8"]):
        model(ids).logits.sum().backward()
    assert calls.count == 0
    grads = [p.grad for n, p in lorakit.lora_parameters(model, "r8") if n.endswith("lora_A")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_adapter_replaced_inside_an_open_block_is_seen_at_once():
    import lorakit

    model = llama_with_adapters()
    names = ["r4", "r8"]
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        before = model(ids).logits
        lorakit.delete_adapter(model, "r8")
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16.0, init="gaussian"), adapter="r8")
        for name, parameter in lorakit.lora_parameters(model, "r8"):
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.2)
        after = model(ids).logits
    with torch.no_grad():
        expected = per_row_logits(model, ids, names)
    assert_close(after, expected)
    assert torch.equal(after[0], before[0]) and (after[1] - before[1]).abs().max() > 0.01


# -- the device-built plan (decode; graph-safe) ------------------------------------------------------------------------

DEVICE_PLAN_CASES = [
    [3, 1, -1, 3, 1, 1],
    list(range(9)),
    [2] * 40 + [-1, 0, 2],  # a segment longer than block_m: several live tiles of one slot
    [-1, -1, -1],
    [0],
    [5, -1, 5, 5, 0, -1, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 5],
]


@pytest.mark.parametrize("slots", DEVICE_PLAN_CASES)
@pytest.mark.parametrize("block_m", [16, 4])
def test_device_plan_equals_host_plan(slots, block_m):
    from lorakit.kernels.multi_lora import plan_rows_device

    slot_of_row = torch.tensor(slots)
    host = plan_rows(slot_of_row, block_m=block_m)
    device = plan_rows_device(slot_of_row, block_m=block_m)
    assert device.num_rows == len(slots) and device.n_tiles == len(slots) and device.block_m == block_m
    live = device.tiles[1] > device.tiles[0]
    assert torch.equal(device.tiles[:, live], host.tiles)  # the same tiles, in the same order
    assert torch.equal(device.tiles[:, ~live], torch.tensor([[0], [0], [-1]], dtype=torch.int32).expand(3, int((~live).sum())))
    n_active = host.row_order.numel()
    assert torch.equal(device.row_order[:n_active], host.row_order)  # stable grouping by slot, as on the host
    assert sorted(device.row_order[n_active:].tolist()) == [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(slot_of_row_from_plan(device), slot_of_row_from_plan(host))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_with_device_plan_match_reference_and_skip_rows_without(dtype):
    from lorakit.kernels.multi_lora import plan_rows_device

    A, B, scalings, ranks = make_stack(37, 130, [4, 8, 16, 8], dtype)
    slot_of_row = torch.tensor([3, -1, 0, 3, 2, -1, 1, 0, 0])
    x = torch.randn(9, 37).to(dtype)
    x[slot_of_row < 0] = float("nan")
    y = torch.randn(9, 130).to(dtype)
    y[slot_of_row < 0] = float("inf")
    before = y.clone()
    multi_lora_add_(y, x, A, B, scalings, ranks, plan_rows_device(slot_of_row))
    assert torch.equal(y[slot_of_row < 0], before[slot_of_row < 0])
    x_clean = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    has = slot_of_row >= 0
    expected = before[has].double() + per_row_float64(x_clean, A, B, scalings, slot_of_row, ranks)[has]
    assert_close(y[has], expected.to(dtype))


@pytest.mark.parametrize("split_k", [1, 3])
def test_shrink_partial_planes_sum_to_the_shrink(split_k):
    # the decode path stores one partial plane per split (no memset, no atomics); the expand adds the planes
    A, B, scalings, ranks = make_stack(300, 40, [4, 16, 8], torch.float32)
    x = torch.randn(6, 300)
    plan = plan_rows(torch.tensor([2, 0, -1, 1, 2, 0]))
    whole = sgmv_shrink(x, A, scalings, ranks, plan, split_k=split_k)
    planes = sgmv_shrink(x, A, scalings, ranks, plan, split_k=split_k, partials=True)
    assert planes.shape[1:] == (6, A.shape[1]) and 1 <= planes.shape[0] <= split_k  # split_k is capped by K's blocks
    assert split_k == 1 or planes.shape[0] > 1
    rows = plan.row_order.long()
    assert_close(planes[:, rows].sum(0), whole[rows], dtype=torch.float32)
    y_planes, y_whole = torch.zeros(6, 40), torch.zeros(6, 40)
    sgmv_expand_add_(y_planes, planes, B, ranks, plan)
    sgmv_expand_add_(y_whole, whole, B, ranks, plan)
    assert_close(y_planes, y_whole, dtype=torch.float32)
    assert torch.equal(y_planes[2], torch.zeros(40))  # the row without adapter: garbage in its planes never read


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_with_every_row_adapted_writes_delta_then_base_gemm_adds(dtype, monkeypatch):
    # long segments (> 16 tokens: 64-row tiles) and no row without adapter: the expand writes the delta and the
    # base GEMM accumulates onto it (beta=1); the result must equal per-row runs and the reference path
    import lorakit
    import lorakit.kernels.triton.sgmv as sgmv

    model = llama_with_adapters(dtype)
    names = ["r16", "r4", "r8", "r4"]
    ids = torch.randint(0, 128, (len(names), 20))
    modes = []
    original = sgmv.sgmv_expand_add_

    def recorded(*args, **kwargs):
        modes.append(kwargs.get("accumulate", True))
        return original(*args, **kwargs)

    monkeypatch.setattr(sgmv, "sgmv_expand_add_", recorded)
    with torch.no_grad():
        with lorakit.mixed_batch(model, names):
            fast = model(ids).logits
        expected = per_row_logits(model, ids, names)
        with lorakit.mixed_batch(model, names + [None]):  # a row without adapter: the accumulate path
            partly = model(torch.cat([ids, ids[:1]])).logits
    assert modes[:14] == [False] * 14 and modes[14:] == [True] * 14
    assert_close(fast, expected)
    assert_close(partly[:4], expected)


@pytest.mark.parametrize("triton", [True, False])
def test_add_without_accumulate_overwrites_planned_rows_only(triton, monkeypatch):
    if not triton:
        monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")  # the reference branch of the dispatcher
    A, B, scalings, ranks = make_stack(37, 130, [4, 8], torch.float32)
    slot_of_row = torch.tensor([0, -1, 1] + [1] * 20)
    x = torch.randn(23, 37)
    y = torch.randn(23, 130)
    before = y.clone()
    multi_lora_add_(y, x, A, B, scalings, ranks, plan_rows(slot_of_row), accumulate=False)
    assert torch.equal(y[1], before[1])
    has = slot_of_row >= 0
    assert_close(y[has], per_row_float64(x, A, B, scalings, slot_of_row, ranks)[has].float())
