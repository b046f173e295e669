"""NF4 storage: bit-identical to bitsandbytes, NF4Linear's forward/backward, quantize(model), bad inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close, tiny_llama
from lorakit.errors import LorakitError
from lorakit.kernels.nf4 import dequantize_nf4
from lorakit.quant import dense_weight, set_dense_weight
from lorakit.quant.merge_loss import LossyMergeWarning, merge_loss, merge_warning
from lorakit.quant.nf4 import NF4Linear, dynamic_code, nf4_roundtrip_error, quantize_nf4
from lorakit.quant.quantize import quantize

bnb = pytest.importorskip("bitsandbytes")  # a test dependency (pyproject [test]); the checks below need it
import bitsandbytes.functional as BF  # noqa: E402

# awkward shapes: numel not a multiple of 64 (partial last block) nor 256 blocks, odd numel (padded nibble),
# and one with several nested (256-block) groups and a partial last group
SHAPES = [(3, 7), (65, 129), (300, 77), (1, 1), (517, 300)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("no_dynamo")  # bitsandbytes' dequantize is compiled: eager here


def _bnb_dequantize(packed, state, dtype):
    state = BF.QuantState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                          quant_type="nf4", dtype=dtype, offset=state.offset, state2=state.state2)
    return BF.dequantize_4bit(packed, state)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_identical_to_bitsandbytes(shape, dtype):
    weight = (torch.randn(shape) * 0.04).to(dtype)
    weight.view(-1)[0] = 0.3  # an outlier: one block with a much larger scale
    packed, state = BF.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(weight)
    assert torch.equal(ours.packed, packed.reshape(-1)), "packed 4-bit codes differ"
    assert torch.equal(ours.absmax, state.absmax), "8-bit absmax codes differ"
    assert torch.equal(ours.nested_absmax, state.state2.absmax), "nested absmax differs"
    assert torch.equal(ours.offset, state.offset), "absmax offset differs"
    assert torch.equal(ours.nested_code, state.state2.code) and torch.equal(ours.code, state.code)
    for out_dtype in DTYPES:
        expected = _bnb_dequantize(packed, state, out_dtype)
        assert torch.equal(dequantize_nf4(ours, out_dtype, force_reference=True), expected), out_dtype


@pytest.mark.parametrize("shape", [(3, 7), (300, 77)])
def test_single_quant_identical_to_bitsandbytes(shape):
    weight = torch.randn(shape)
    packed, state = BF.quantize_4bit(weight, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(weight, double_quant=False)
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours, torch.float32, force_reference=True),
                       BF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes_identical_to_bitsandbytes(blocksize):
    weight = torch.randn(37, 91)
    packed, state = BF.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(weight, blocksize=blocksize)
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours, torch.float32, force_reference=True), BF.dequantize_4bit(packed, state))


def test_zero_blocks_identical_to_bitsandbytes():
    weight = torch.randn(8, 64)
    weight[2:5] = 0.0  # three all-zero blocks
    packed, state = BF.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(weight)
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours, torch.float32, force_reference=True), _bnb_dequantize(packed, state, torch.float32))
    zeros = torch.zeros(5, 13)
    packed, state = BF.quantize_4bit(zeros, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(zeros)
    assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(ours, torch.float32, force_reference=True), zeros)


def test_layout_high_nibble_first_and_odd_padding():
    # 3 values: codes for -1 (0), 1 (15), 0 (7) -> bytes 0x0F, then 0x7 in the high nibble and the pad code 7 low
    ours = quantize_nf4(torch.tensor([[-1.0, 1.0, 0.0]]))
    assert ours.packed.tolist() == [0x0F, 0x77]
    assert dynamic_code()[0].item() == pytest.approx(-0.99297, abs=1e-5) and dynamic_code()[-1].item() == 1.0


def test_roundtrip_error_is_reported():
    weight = torch.randn(64, 96) * 0.02
    error = nf4_roundtrip_error(weight)
    assert 0.0 < error["relative_rms"] < 0.15  # NF4 keeps about 10% relative RMS error on Gaussian weights
    assert error["max_abs"] <= weight.abs().max().item()


# -- bad inputs ----------------------------------------------------------------------------------------------------


def test_non_finite_weights_refused_naming_the_module():
    weight = torch.randn(4, 8)
    weight[1, 3] = float("nan")
    with pytest.raises(LorakitError, match="layers.0.q_proj.*non-finite"):
        quantize_nf4(weight, name="layers.0.q_proj")
    weight[1, 3] = float("inf")
    with pytest.raises(LorakitError, match="non-finite"):
        NF4Linear.from_weight(weight, name="x")


def test_quantize_model_refuses_nan_before_changing_anything():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LorakitError, match="model.layers.1.mlp.up_proj"):
        quantize(model, "nf4")
    assert not any(isinstance(m, NF4Linear) for m in model.modules())


@pytest.mark.parametrize("bad, message", [
    (dict(weight=torch.randn(2, 3, 4)), "2-D"),
    (dict(weight=torch.randint(0, 3, (4, 4))), "float32/float16/bfloat16"),
    (dict(weight=torch.randn(4, 4), blocksize=48), "blocksize"),
])
def test_bad_weights_refused(bad, message):
    with pytest.raises(LorakitError, match=message):
        quantize_nf4(**bad)


def test_unknown_quant_type_refused_by_name():
    with pytest.raises(LorakitError, match="'fp4'.*nf4"):
        quantize(tiny_llama(), "fp4")


def test_load_dense_shape_mismatch_refused():
    layer = NF4Linear.from_weight(torch.randn(6, 10))
    with pytest.raises(LorakitError, match=r"\(6, 11\).*\(6, 10\)"):
        layer.load_dense(torch.randn(6, 11))


def test_wrong_input_width_refused():
    layer = NF4Linear.from_weight(torch.randn(6, 10))
    with pytest.raises(LorakitError, match=r"\(\.\.\., 10\)"):
        layer(torch.randn(2, 9))


# -- NF4Linear ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["reference", "auto"])
def test_nf4linear_forward_and_input_grad_equal_dense_over_dequantized(dtype, mode):
    linear = nn.Linear(77, 45, bias=True)
    layer = NF4Linear.from_linear(linear).to(dtype)
    layer.bias.requires_grad_(True)
    layer.mode = mode
    x = torch.randn(3, 5, 77, dtype=dtype, requires_grad=True)
    y = layer(x)
    dense = layer.dequantize(dtype)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = layer.bias.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, dense, bias_ref)
    assert y.dtype == dtype and y.shape == (3, 5, 45)
    assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert_close(x.grad, x_ref.grad)
    assert_close(layer.bias.grad, bias_ref.grad)


def test_backward_saves_no_dense_weight():
    layer = NF4Linear.from_weight(torch.randn(64, 96))
    x = torch.randn(4, 96, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert all(shape != (64, 96) for shape, _ in saved), saved
    assert ((3072,), torch.uint8) in saved  # the packed weight is what is kept


def test_to_dtype_keeps_quantization_state_float32_and_state_dict_has_no_float_weight():
    layer = NF4Linear.from_linear(nn.Linear(70, 33))
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert layer.nested_absmax.dtype == torch.float32 and layer.code.dtype == torch.float32
    assert torch.equal(layer.dequantize(), before)
    state = layer.state_dict()
    assert "weight" not in state and state["weight_packed"].dtype == torch.uint8
    fresh = NF4Linear(70, 33, bias=True, bias_dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dequantize(), before)


def test_load_dense_requantizes_and_dense_weight_roundtrip():
    layer = NF4Linear.from_weight(torch.randn(20, 40))
    packed = layer.weight_packed.clone()
    set_dense_weight(layer, dense_weight(layer))  # re-quantizing the dequantized weight keeps every 4-bit code
    assert torch.equal(layer.weight_packed, packed)
    new = torch.randn(20, 40)
    set_dense_weight(layer, new)
    assert torch.equal(layer.dequantize(), dequantize_nf4(quantize_nf4(new), torch.float32))


# -- quantize(model) ------------------------------------------------------------------------------------------------


def test_quantize_model_replaces_linears_but_not_the_head():
    model = tiny_llama()
    dense = tiny_llama()
    quantize(model, "nf4")
    names = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(names) == 14 and "lm_head" not in names and isinstance(model.lm_head, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n != "lm_head")
    # the quantized model computes exactly what the dense model computes with the dequantized weights
    with torch.no_grad():
        for name in names:
            dense.get_submodule(name).weight.copy_(model.get_submodule(name).dequantize())
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_quantize_skip_and_tied_head():
    model = quantize(tiny_llama(), "nf4", skip=("lm_head", "down_proj"))
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    tied = tiny_llama(tie_word_embeddings=True)
    quantize(tied, "nf4", skip=())
    assert isinstance(tied.lm_head, nn.Linear) and tied.lm_head.weight is tied.model.embed_tokens.weight


# -- merge loss ------------------------------------------------------------------------------------------------------


def test_merge_warning_reports_the_loss_unless_allowed():
    layer = NF4Linear.from_weight(torch.randn(32, 64) * 0.02)
    small_delta = layer.dequantize() + 1e-5 * torch.randn(32, 64)  # far below the NF4 step: almost all lost
    loss = merge_loss(layer, small_delta)
    assert loss["kept"] < 0.2 and loss["delta_rms"] > 0
    with pytest.warns(LossyMergeWarning, match="survives"):
        merge_warning(layer, small_delta, name="q_proj")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert merge_warning(layer, small_delta, allow_lossy=True) is None
        assert merge_warning(nn.Linear(3, 3)) is None
