"""Every variant through the same invariants: starts equal to the base, matches the naive formula element by
element, gradients match, merge/unmerge round trips, mixed batches equal per-row runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.inject import lora_layers
from lorakit.layers import LoraEmbedding, LoraLinear
from conftest import assert_close, tiny_llama

VARIANTS = ["lora", "rslora", "dora"]


def randomize(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Give adapters non-zero B (and perturbed DoRA magnitudes) so they actually change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def naive_linear(layer: LoraLinear, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """The formula from the papers, written out (float64) independently of the library's code paths."""
    ad = layer.adapters[name]
    W = layer.base_layer.weight.double()
    bias = None if layer.base_layer.bias is None else layer.base_layer.bias.double()
    adapted = W + ad.scaling * ad.lora_B.double() @ ad.lora_A.double()
    if ad.variant_name == "dora":
        norm = torch.linalg.vector_norm(adapted, dim=1, keepdim=True)
        adapted = ad.magnitude.double().unsqueeze(1) * adapted / norm
    return F.linear(x.double(), adapted, bias)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_adapter_equals_base(variant):
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    expected = model(ids).logits
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant=variant))
    assert_close(model(ids).logits, expected)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 130, 37)])
def test_linear_matches_naive_formula_and_gradients(variant, shape):
    in_f, out_f, rank = shape[1], shape[2], 3
    base = nn.Linear(in_f, out_f, bias=True)
    model = nn.Sequential(base)
    lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=5.0, variant=variant, target_modules=["0"]))
    randomize(model)
    layer = model[0]
    x = torch.randn(shape[0], 4, in_f, dtype=torch.float32, requires_grad=True)
    out = layer(x)
    assert_close(out, naive_linear(layer, x).float())
    # gradients w.r.t. A, B (and magnitude) against float64 autograd of the naive formula
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ad = layer.adapters["default"]
    A = ad.lora_A.detach().double().requires_grad_()
    B = ad.lora_B.detach().double().requires_grad_()
    W = base.weight.detach().double()
    adapted = W + ad.scaling * B @ A
    if variant == "dora":
        m = ad.magnitude.detach().double().requires_grad_()
        norm = torch.linalg.vector_norm(adapted, dim=1, keepdim=True).detach()  # detached, as in DoRA
        adapted = m.unsqueeze(1) * adapted / norm
    ref = F.linear(x.detach().double(), adapted, base.bias.detach().double())
    ref.backward(grad_out.double())
    assert_close(ad.lora_A.grad, A.grad.float())
    assert_close(ad.lora_B.grad, B.grad.float())
    if variant == "dora":
        assert_close(ad.magnitude.grad, m.grad.float())
    assert base.weight.grad is None  # the base is frozen


def test_rslora_scaling_and_rank_alpha_patterns():
    model = tiny_llama()
    config = lorakit.LoraConfig(r=4, alpha=8, variant="rslora", rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})
    lorakit.inject(model, config)
    q0 = model.model.layers[0].self_attn.q_proj.adapters["default"]
    v0 = model.model.layers[0].self_attn.v_proj.adapters["default"]
    q1 = model.model.layers[1].self_attn.q_proj.adapters["default"]
    assert (q0.rank, q0.scaling) == (4, 8 / 2)
    assert (v0.rank, v0.lora_A.shape, v0.scaling) == (2, (2, 32), 8 / 2 ** 0.5)
    assert q1.scaling == 3 / 2


def test_all_linear_skips_output_head_and_freezes_base():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert len(wrapped) == 2 * 7 and not any("lm_head" in n for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    report = lorakit.trainable_report(model)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < report.share < 1


def test_target_regex_exclude_and_embedding():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=r".*\.(q_proj|embed_tokens)", exclude_modules=["layers.1.self_attn.q_proj"]))
    names = {n for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding))}
    assert names == {"model.embed_tokens", "model.layers.0.self_attn.q_proj"}


def test_embedding_matches_naive_formula():
    emb = nn.Embedding(50, 6, padding_idx=0)
    model = nn.Sequential(emb)
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=6, target_modules=["0"]))
    with torch.no_grad():
        model[0].adapters["default"].lora_A.normal_()
    ids = torch.randint(0, 50, (3, 5))
    ad = model[0].adapters["default"]
    expected = F.embedding(ids, emb.weight + ad.scaling * (ad.lora_B @ ad.lora_A).T)
    assert_close(model(ids), expected)


def test_conv1d_gpt2_matches_naive():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).eval()
    ids = torch.randint(0, 64, (2, 5))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    randomize(model)
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, 16)
    ad = layer.adapters["default"]
    W = layer.base_layer.weight.T  # Conv1D stores (in, out)
    assert_close(layer(x), F.linear(x, W + ad.scaling * ad.lora_B @ ad.lora_A, layer.base_layer.bias))
    merged_logits_before = model(ids).logits
    lorakit.merge(model)
    assert_close(model(ids).logits, merged_logits_before, torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_roundtrip_float32(variant):
    model = tiny_llama()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (2, 6))
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant=variant))
    randomize(model)
    adapted = model(ids).logits
    lorakit.merge(model)
    assert_close(model(ids).logits, adapted)
    lorakit.unmerge(model)
    assert_close(model(ids).logits, adapted)
    for name, param in model.named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in original:
            rel = (param - original[clean]).norm() / original[clean].norm()
            assert rel < 1e-6, f"{name}: merge/unmerge changed the base by {rel:.2e} relative"


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_bf16_within_table(variant):
    model = tiny_llama().to(torch.bfloat16)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant=variant))
    assert model.model.layers[0].mlp.up_proj.adapters["default"].lora_A.dtype == torch.float32  # adapters stay fp32
    randomize(model, std=0.02)
    lorakit.merge(model)
    lorakit.unmerge(model)
    for name, param in model.named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in original:
            assert_close(param, original[clean], torch.bfloat16)


def test_merge_and_unload_gives_plain_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    lorakit.inject(model, lorakit.LoraConfig(r=4, modules_to_save=["lm_head"]))
    randomize(model)
    with torch.no_grad():
        model.lm_head.copies["default"].weight.add_(0.1)
    adapted = model(ids).logits
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, (LoraLinear, lorakit.layers.ModulesToSave)) for m in plain.modules())
    assert_close(plain(ids).logits, adapted)


def test_safe_merge_refuses_nan_and_leaves_base():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    randomize(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.adapters["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(lorakit.LorakitError, match="NaN/Inf"):
        lorakit.merge(model)
    for n, p in model.named_parameters():
        if "lora_B" not in n:
            assert torch.equal(p, before[n]), n
    assert not any(l.merged for l in lora_layers(model).values())


def test_safe_merge_checks_the_dtype_the_weight_is_stored_in():
    """A float16 base: a merged value past 65504 is finite in float32 and inf once stored."""
    model = tiny_llama().half()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        layer = model.model.layers[0].self_attn.q_proj
        layer.adapters["default"].lora_A.fill_(1.0)
        layer.adapters["default"].lora_B.zero_()
        layer.adapters["default"].lora_B[0, 0] = 10000.0  # x alpha / r = 8: row 0 gets 80,000 > 65,504
    with pytest.raises(lorakit.LorakitError, match="beyond float16's range"):
        lorakit.merge(model)
    assert not layer.merged and torch.isfinite(layer.base_layer.weight).all()


def test_dora_zero_row_is_finite():
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.weight[2].zero_()
    model = nn.Sequential(base)
    lorakit.inject(model, lorakit.LoraConfig(r=2, variant="dora", target_modules=["0"]))
    x = torch.randn(3, 6)
    out = model(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for _, p in lorakit.lora_parameters(model))
    lorakit.merge(model)
    assert torch.isfinite(base.weight).all()
    assert_close(model(x), out.detach())


def test_dropout_only_in_training_and_eval_does_not_merge():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, dropout=0.5))
    randomize(model)
    ids = torch.randint(0, 128, (2, 6))
    model.eval()
    a, b = model(ids).logits, model(ids).logits
    assert torch.equal(a, b)
    assert not any(l.merged for l in lora_layers(model).values())  # eval() never merges
    model.train()
    assert not torch.equal(model(ids).logits, a)


def test_gaussian_and_pissa_init():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    expected = model(ids).logits
    lorakit.inject(model, lorakit.LoraConfig(r=4, init="pissa"))
    ad = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert ad.lora_B.abs().sum() > 0  # PiSSA starts from the principal components, not zero
    assert_close(model(ids).logits, expected)  # residual + principal part == original
    other = tiny_llama()
    lorakit.inject(other, lorakit.LoraConfig(r=4, init="gaussian"))
    std = other.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.std().item()
    assert 0.15 < std < 0.35  # normal(0, 1/r) with r=4


def test_model_moves_and_casts_after_inject():
    """``.to()`` / ``.double()`` walk every module through nn.Module._apply; the LoRA layers must not shadow it."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    randomize(model)
    ids = torch.randint(0, 128, (2, 5))
    expected = model(ids).logits.double()
    model.to(torch.float64)
    assert model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.dtype == torch.float64
    assert_close(model(ids).logits, expected, torch.float32)


def test_adapter_init_draws_from_the_cpu_generator_on_any_device():
    """lorakit train --fsdp injects on the CPU, one process on its GPU: the same seed must give the same lora_A, so
    the init draws on the CPU and copies (a GPU's generator gives other numbers for the same seed)."""
    import math

    from lorakit.layers import init_from_cpu

    class OnAnotherDevice:  # what init_from_cpu reads of a GPU parameter
        device = torch.device("cuda", 0)
        shape = (4, 6)
        dtype = torch.float32

        def copy_(self, values):
            self.values = values.clone()

    def fill(t):
        return torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))

    torch.manual_seed(3)
    on_gpu = OnAnotherDevice()
    init_from_cpu(on_gpu, fill)
    torch.manual_seed(3)
    on_cpu = torch.empty(4, 6)
    init_from_cpu(on_cpu, fill)
    assert torch.equal(on_gpu.values, on_cpu)
    torch.manual_seed(3)
    assert torch.equal(fill(torch.empty(4, 6)), on_cpu)  # on the CPU: the same draws as before


def test_training_a_merged_adapter_is_refused_not_silently_a_no_op():
    """A merged adapter's tensors get no gradient (it is in W): with gradient checkpointing's input gradients
    (Trainer calls enable_input_require_grads) backward ran and training changed nothing, silently."""
    model = tiny_llama(seed=3)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="a")
    lorakit.merge(model)
    ids = torch.tensor([[1, 2, 3]])
    model.train()
    model(ids)  # a forward that cannot train anything (no gradient reaches it) is not refused
    model.enable_input_require_grads()
    with pytest.raises(lorakit.LorakitError, match="adapter 'a' is merged .* call lorakit.unmerge"):
        model(ids).logits.sum().backward()
    with torch.no_grad():
        model(ids)  # inference in train mode (dropout) is fine
    model.eval()
    model(ids)  # so is an eval forward with gradients on
    lorakit.inject(model.train(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="b")
    lorakit.set_adapter(model, ["a", "b"])  # "a" merged, "b" trains on top of it: allowed
    model(ids).logits.sum().backward()
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.adapters["b"].lora_A.grad is not None and layer.adapters["a"].lora_A.grad is None
    lorakit.unmerge(model)
    model(ids).logits.sum().backward()
    assert layer.adapters["a"].lora_A.grad is not None  # unmerged, "a" trains again
