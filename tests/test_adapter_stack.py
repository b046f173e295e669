"""The device layout for many adapters: slots, padding, in-place load/evict, growth, sync with a layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_close
from lorakit.adapter_stack import AdapterStack, LayerStack, stack_dtype_for, stack_for_layer
from lorakit.errors import LorakitError
from lorakit.kernels.multi_lora import multi_lora_delta_reference


def adapter(d_in, d_out, r, dtype=torch.float32):
    return torch.randn(r, d_in).to(dtype) / d_in**0.5, torch.randn(d_out, r).to(dtype), 2.0 / r


def formula(x, lora_A, lora_B, scaling):
    return (x.double() @ lora_A.double().T @ lora_B.double().T) * scaling


def buffers(stack: AdapterStack):
    return [(t.data_ptr(), t.shape) for layer in stack.layers.values() for t in (layer.lora_A, layer.lora_B, layer.scaling, layer.rank)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_each_slot_gives_its_adapter_and_padding_is_zero(dtype):
    stack = AdapterStack({"q": (37, 130)}, slots=4, r_max=16, dtype=dtype)
    weights = {name: adapter(37, 130, r, dtype) for name, r in [("a", 4), ("b", 16), ("c", 8)]}
    for name, w in weights.items():
        stack.load(name, {"q": w})
    layer = stack.layers["q"]
    a = stack.slot_of["a"]
    assert int(layer.rank[a]) == 4 and layer.lora_A[a, 4:].abs().sum() == 0 and layer.lora_B[a, :, 4:].abs().sum() == 0
    names = ["c", None, "a", "b", "a", None, "b"]
    x = torch.randn(len(names), 37).to(dtype)
    delta = layer.delta(x, torch.tensor(stack.slots_for(names)))
    for i, name in enumerate(names):
        expected = torch.zeros(130, dtype=torch.float64) if name is None else formula(x[i], *weights[name])
        assert_close(delta[i], expected)


def test_load_and_evict_do_not_reallocate_or_touch_other_slots():
    stack = AdapterStack({"q": (37, 130), "v": (37, 20)}, slots=4, r_max=16)
    for name, r in [("a", 4), ("b", 16), ("c", 8)]:
        stack.load(name, {"q": adapter(37, 130, r), "v": adapter(37, 20, r)})
    before = buffers(stack)
    x = torch.randn(6, 37)
    names = ["a", "b", "c", "a", "b", "c"]
    slots = torch.tensor(stack.slots_for(names))
    outputs = {k: layer.delta(x, slots) for k, layer in stack.layers.items()}

    stack.evict("b")
    stack.load("d", {"q": adapter(37, 130, 16), "v": adapter(37, 20, 16)})  # takes b's slot, and the free one is left
    stack.load("a", {"q": adapter(37, 130, 8), "v": adapter(37, 20, 8)})  # reload a (other rank) in place
    stack.load("e", {"q": adapter(37, 130, 4), "v": adapter(37, 20, 4)})  # the last free slot
    assert buffers(stack) == before
    keep = torch.tensor([n == "c" for n in names])
    for k, layer in stack.layers.items():
        after = layer.delta(x, slots)
        assert torch.equal(after[keep], outputs[k][keep])  # bit-identical for the untouched adapter


def test_evicted_slot_gives_exactly_zero():
    stack = AdapterStack({"q": (37, 13)}, slots=2, r_max=8)
    slot = stack.load("a", {"q": adapter(37, 13, 8)})
    stack.evict("a")
    out = stack.layers["q"].delta(torch.randn(3, 37), torch.full((3,), slot))
    assert torch.equal(out, torch.zeros(3, 13))
    with pytest.raises(LorakitError, match="not loaded"):
        stack.slots_for(["a"])
    with pytest.raises(LorakitError, match="not loaded"):
        stack.evict("a")


def test_growing_capacity_and_rank_keeps_loaded_adapters():
    stack = AdapterStack({"q": (37, 13)}, slots=1, r_max=4)
    w_a = adapter(37, 13, 4)
    stack.load("a", {"q": w_a})
    stack.load("b", {"q": adapter(37, 13, 4)})  # no free slot: doubles the capacity
    assert stack.capacity == 2
    w_c = adapter(37, 13, 12)
    stack.load("c", {"q": w_c})  # rank above r_max: grows r_max
    assert stack.r_max == 12 and stack.capacity == 4
    x = torch.randn(4, 37)
    out = stack.layers["q"].delta(x, torch.tensor(stack.slots_for(["a", "c", "a", None])))
    assert_close(out[0], formula(x[0], *w_a))
    assert_close(out[1], formula(x[1], *w_c))
    assert torch.equal(out[3], torch.zeros(13))


def test_adapter_missing_on_a_layer_contributes_nothing_there():
    stack = AdapterStack({"q": (37, 13), "v": (37, 5)}, slots=2, r_max=4)
    stack.load("old", {"q": adapter(37, 13, 4), "v": adapter(37, 5, 4)})
    stack.evict("old")
    slot = stack.load("q-only", {"q": adapter(37, 13, 4)})  # reuses old's slot: v must be cleared
    out = stack.layers["v"].delta(torch.randn(2, 37), torch.full((2,), slot))
    assert torch.equal(out, torch.zeros(2, 5))


def test_user_mistakes_raise_lorakit_errors():
    stack = AdapterStack({"q": (37, 13)}, slots=2, r_max=4)
    with pytest.raises(LorakitError, match="do not fit this layer"):
        stack.load("a", {"q": adapter(36, 13, 4)})
    with pytest.raises(LorakitError, match="layers the stack does not hold"):
        stack.load("a", {"k": adapter(37, 13, 4)})
    with pytest.raises(LorakitError, match="r_max"):
        LayerStack(37, 13, 2, 4, torch.float32, "cpu").load(0, *adapter(37, 13, 8))


def test_stack_dtype_rule():
    assert stack_dtype_for(torch.bfloat16, torch.float32) == torch.bfloat16
    assert stack_dtype_for(torch.float32, torch.float32) == torch.float32
    assert stack_dtype_for(torch.float16, torch.float16) == torch.float16


class FakeAdapter(nn.Module):
    def __init__(self, d_in, d_out, r):
        super().__init__()
        self.rank, self.scaling = r, 2.0 / r
        self.lora_A = nn.Parameter(torch.randn(r, d_in))
        self.lora_B = nn.Parameter(torch.randn(d_out, r))


class FakeLayer(nn.Module):
    in_features, out_features = 37, 13

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()


def layer_delta(layer, names, x):
    stack, slots = stack_for_layer(layer, names, x.device, x.dtype)
    return stack.layers[""].delta(x, torch.tensor(slots)), stack


def test_layer_stack_follows_in_place_updates_deletes_and_re_adds():
    layer = FakeLayer()
    layer.adapters["a"] = FakeAdapter(37, 13, 4)
    layer.adapters["b"] = FakeAdapter(37, 13, 8)
    x = torch.randn(3, 37)

    def expected(names):
        return torch.stack([torch.zeros(13, dtype=torch.float64) if n not in layer.adapters else
                            formula(x[i], layer.adapters[n].lora_A, layer.adapters[n].lora_B, layer.adapters[n].scaling)
                            for i, n in enumerate(names)])

    names = ["a", "b", None]
    out, stack = layer_delta(layer, names, x)
    assert_close(out, expected(names))
    ptr = stack.layers[""].lora_A.data_ptr()
    with torch.no_grad():
        layer.adapters["a"].lora_B.mul_(3.0)  # an optimizer step: in place
    assert_close(layer_delta(layer, names, x)[0], expected(names))
    del layer.adapters["b"]
    layer.adapters["b"] = FakeAdapter(37, 13, 8)  # same name, new weights
    assert_close(layer_delta(layer, names, x)[0], expected(names))
    del layer.adapters["a"]
    out, stack = layer_delta(layer, names, x)  # a deleted: its rows get nothing
    assert torch.equal(out[0], torch.zeros(13)) and "a" not in stack
    assert stack.layers[""].lora_A.data_ptr() == ptr  # all of that happened inside the existing capacity


def test_layer_stacks_with_same_adapters_agree_on_slots():
    layers = [FakeLayer(), FakeLayer()]
    for layer in layers:
        for name, r in [("a", 4), ("b", 8), ("c", 4)]:
            layer.adapters[name] = FakeAdapter(37, 13, r)
    names = ["c", "a", None, "c"]
    slots = [stack_for_layer(layer, names, torch.device("cpu"), torch.float32)[1] for layer in layers]
    assert slots[0] == slots[1] and slots[0][2] == -1


def test_reference_agrees_with_stack_delta_for_float16():
    stack = AdapterStack({"q": (37, 130)}, slots=3, r_max=16, dtype=torch.float16)
    for name, r in [("a", 4), ("b", 16)]:
        stack.load(name, {"q": adapter(37, 130, r)})
    layer = stack.layers["q"]
    x = torch.randn(5, 37, dtype=torch.float16)
    slots = torch.tensor(stack.slots_for(["a", "b", None, "b", "a"]))
    assert_close(layer.delta(x, slots), multi_lora_delta_reference(x, layer.lora_A, layer.lora_B, layer.scaling, slots, layer.rank))


def test_stack_first_built_under_inference_mode_still_loads_later():
    stack = None
    with torch.inference_mode():
        stack = AdapterStack({"q": (37, 13)}, slots=1, r_max=4)
        stack.load("a", {"q": adapter(37, 13, 4)})
    w = adapter(37, 13, 8)
    with torch.no_grad():
        stack.load("a", {"q": w})  # in place, and a growth of r_max
        stack.load("b", {"q": adapter(37, 13, 4)})
    x = torch.randn(1, 37)
    assert_close(stack.layers["q"].delta(x, torch.tensor(stack.slots_for(["a"])))[0], formula(x[0], *w))


def test_decode_plans_are_built_on_the_device_and_shared():
    # seq_len 1 (decode): the cached plan comes from plan_rows_device (fixed T tiles, no host sort), prefill from
    # the host planner; both describe the same rows, and a second lookup returns the very same object (all layers
    # of a forward share it, and a captured CUDA graph keeps reading its tensors)
    import collections

    from lorakit.adapter_stack import plan_for_slots
    from lorakit.kernels.multi_lora import slot_of_row_from_plan

    cache = collections.OrderedDict()
    slots = (3, -1, 0, 3, 1, 1, -1, 2)
    decode = plan_for_slots(slots, 1, torch.device("cpu"), cache)
    assert decode.n_tiles == len(slots) and decode.max_segment == -1
    assert slot_of_row_from_plan(decode).tolist() == list(slots)
    assert plan_for_slots(slots, 1, torch.device("cpu"), cache) is decode
    prefill = plan_for_slots(slots, 5, torch.device("cpu"), cache)
    assert prefill.max_segment == 10 and slot_of_row_from_plan(prefill).tolist() == [s for s in slots for _ in range(5)]
    stack = AdapterStack({"q": (37, 130)}, slots=4, r_max=8)
    weights = {name: adapter(37, 130, r) for name, r in [("a", 4), ("b", 8), ("c", 2), ("d", 8)]}
    for name, w in weights.items():
        stack.load(name, {"q": w})
    x = torch.randn(len(slots), 37)
    y = torch.zeros(len(slots), 130)
    stack.add_("q", y, x, decode)
    name_of = {v: k for k, v in stack.slot_of.items()}
    for i, s in enumerate(slots):
        expected = torch.zeros(130, dtype=torch.float64) if s < 0 else formula(x[i], *weights[name_of[s]])
        assert_close(y[i], expected.float())
