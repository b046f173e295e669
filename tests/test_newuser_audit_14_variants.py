"""Training equivalence with the real peft package (0.21), which users treat as the reference (audit 14).

The other peft tests compare forward outputs of saved files; these compare what training sees. The same adapter is
built in lorakit and in peft on copies of one tiny random model (Llama; GPT-2, whose Conv1D layers peft handles with
``fan_in_fan_out``; a Llama with tied embeddings), lorakit's initial A / B / magnitude are copied into peft's modules,
one batch runs through both, and the loss and every adapter parameter's gradient are compared element by element
with the shared tolerance table (conftest.TOLERANCE), in float32 and float64. Measured (2026-11-30, CPU, torch 2.13):
float32 gradients differ by at most 4e-7 of their largest value, float64 by at most 6e-16 (the losses are equal).

Found here: a float64 model got float32 adapters, and DoRA formed its weight norm in float32, so float64 gradients
differed from peft's by ~1e-7 (the table's float64 rtol is 1e-10).
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import assert_close
from lorakit.inject import adapter_hosts, lora_layers
from lorakit.layers import LoraEmbedding, ModulesToSave
from test_layers import randomize
from test_peft_sweep import build

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def twins(kind: str, dtype: torch.dtype, variant: str = "lora", targets=("q_proj", "v_proj", "down_proj"),
          modules_to_save=None, dropout: float = 0.0, init: str = "default", random_b: bool = True,
          adapter_dtype: torch.dtype | None = None):
    """(lorakit model, peft model, [(name, lorakit tensor, peft tensor)]) with equal bases and equal adapters."""
    base = build(kind).to(dtype)
    theirs = copy.deepcopy(base)
    ours = lorakit.inject(base, lorakit.LoraConfig(r=4, alpha=8, variant=variant, target_modules=list(targets), init=init,
                                                   modules_to_save=modules_to_save, dropout=dropout),
                          dtype=adapter_dtype)
    if random_b:
        randomize(ours)
        with torch.no_grad():  # an embedding adapter starts with A = 0 (B normal): give A values so B learns
            for host in lora_layers(ours).values():
                if isinstance(host, LoraEmbedding):
                    host.adapters["default"].lora_A.normal_(std=0.2, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on tied embeddings
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=list(targets), modules_to_save=modules_to_save, lora_dropout=dropout,
            use_rslora=variant in ("rslora", "rsdora"), use_dora=variant in ("dora", "rsdora"),
            init_lora_weights=init if init != "default" else False, fan_in_fan_out=kind == "gpt2"))
    pairs = []
    inner = theirs.base_model.model
    for path, host in adapter_hosts(ours).items():
        module = inner.get_submodule(path)
        if isinstance(host, ModulesToSave):
            copies = zip(host.copies["default"].named_parameters(), module.modules_to_save["default"].parameters())
            pairs += [(f"{path}.{n}", p, q) for (n, p), q in copies]
            continue
        adapter = host.adapters["default"]
        if isinstance(host, LoraEmbedding):
            pairs += [(f"{path}.A", adapter.lora_A, module.lora_embedding_A["default"]),
                      (f"{path}.B", adapter.lora_B, module.lora_embedding_B["default"])]
        else:
            pairs += [(f"{path}.A", adapter.lora_A, module.lora_A["default"].weight),
                      (f"{path}.B", adapter.lora_B, module.lora_B["default"].weight)]
        if adapter.magnitude is not None:
            pairs.append((f"{path}.magnitude", adapter.magnitude, module.lora_magnitude_vector["default"].weight))
    if init == "default":
        with torch.no_grad():
            for _, mine, peft_tensor in pairs:
                peft_tensor.copy_(mine)
    return ours, theirs, pairs


def loss_and_backward(model, seed: int = 0) -> torch.Tensor:
    model.train()
    torch.manual_seed(seed)  # the same dropout masks in both models
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach()


CASES = {
    "lora": dict(kind="llama"),
    "rslora": dict(kind="llama", variant="rslora"),
    "dora": dict(kind="llama", variant="dora"),
    "rsdora": dict(kind="llama", variant="rsdora"),
    "gpt2-conv1d-lora": dict(kind="gpt2", targets=("c_attn", "c_fc", "c_proj")),
    "gpt2-conv1d-dora": dict(kind="gpt2", variant="dora", targets=("c_attn", "c_fc")),
    "tied-embedding-lora": dict(kind="llama-tied", targets=("q_proj", "embed_tokens")),
    "embedding-dora": dict(kind="llama", variant="dora", targets=("q_proj", "embed_tokens")),
    "modules-to-save": dict(kind="llama", targets=("q_proj",), modules_to_save=["lm_head", "norm"]),
    "dropout-lora": dict(kind="llama", dropout=0.1),
    "dropout-dora": dict(kind="llama", variant="dora", dropout=0.1),
}
FLOAT32_CASES = ["lora", "dora", "gpt2-conv1d-dora", "tied-embedding-lora", "modules-to-save", "dropout-dora"]


@pytest.mark.parametrize("dtype,case", [(torch.float64, c) for c in CASES] + [(torch.float32, c) for c in FLOAT32_CASES])
def test_loss_and_every_gradient_equal_peft(dtype, case):
    """Dropout masks are equal too: both draw one mask per adapted layer, in the same order, from the global
    generator (seeded before each forward). DoRA's weight norm is detached in both (the paper's section 4.3): a
    lorakit norm that kept its graph would give other gradients for A, B and the magnitude."""
    ours, theirs, pairs = twins(dtype=dtype, **CASES[case])
    assert pairs and all(mine.dtype == dtype and peft_tensor.dtype == dtype for _, mine, peft_tensor in pairs)
    assert_close(loss_and_backward(ours), loss_and_backward(theirs))
    for name, mine, peft_tensor in pairs:
        assert mine.grad is not None and mine.grad.abs().max() > 0, name
        assert_close(mine.grad, peft_tensor.grad, msg=f"{case}: gradient of {name}")


@pytest.mark.parametrize("targets", [("q_proj", "down_proj"), ("embed_tokens",)])
def test_dora_weight_norm_is_formed_in_the_adapters_dtype(targets):
    """DoRA's ``||W + s B A||`` took ``s B A`` from ``LF.delta_weight``, which is float32 (merging's precision): with
    float64 adapters (``inject(..., dtype=torch.float64)``) the norm, so the output and every gradient, was rounded
    to float32 and differed from peft's by ~1e-7."""
    ours, theirs, pairs = twins("llama", torch.float64, variant="dora", targets=targets, adapter_dtype=torch.float64)
    assert_close(loss_and_backward(ours), loss_and_backward(theirs))
    for name, mine, peft_tensor in pairs:
        assert_close(mine.grad, peft_tensor.grad, msg=f"gradient of {name}")


def test_a_float64_base_gets_float64_adapters():
    """``add_adapter`` meant float64 adapters on a float64 base (as peft's), but read the dtype of the weight it had
    already cast to float32: every adapter was float32, and a DoRA magnitude was the norm of a float32-rounded W."""
    model = build("llama").double()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant="dora", target_modules=["q_proj", "embed_tokens"]))
    for host in lora_layers(model).values():
        adapter = host.adapters["default"]
        assert {adapter.lora_A.dtype, adapter.lora_B.dtype, adapter.magnitude.dtype} == {torch.float64}
        exact = torch.linalg.vector_norm(host.linear_weight(torch.float64), dim=1)
        assert_close(adapter.magnitude.detach(), exact)
    bf16 = build("llama").to(torch.bfloat16)  # a 16-bit base still trains float32 adapters
    lorakit.inject(bf16, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    assert bf16.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.dtype == torch.float32


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_a_float64_model_draws_the_adapter_a_float32_model_draws(init):
    """Same seed, same adapter in both dtypes (float32 draws, exact in float64), as before adapters followed a float64
    base: a float64 model is the reference the float32 and 16-bit ones are checked against (test_tolerances)."""
    made = {}
    for dtype in (torch.float32, torch.float64):
        model = build("llama").to(dtype)
        torch.manual_seed(7)
        lorakit.inject(model, lorakit.LoraConfig(r=4, init=init, target_modules=["q_proj", "embed_tokens"]))
        made[dtype] = {n: p.detach() for n, p in lorakit.lora_parameters(model)}
    assert made[torch.float64]["model.layers.0.self_attn.q_proj.adapters.default.lora_A"].dtype == torch.float64
    for name, tensor in made[torch.float32].items():
        assert torch.equal(made[torch.float64][name], tensor.double()), name
