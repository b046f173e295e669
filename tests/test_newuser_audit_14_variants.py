"""Training equivalence with the real peft package (0.21), which users treat as the reference (audit 14).

The other peft tests compare forward outputs of saved files; these compare what training sees. The same adapter is
built in lorakit and in peft on copies of one tiny random model (Llama; GPT-2, whose Conv1D layers peft handles with
``fan_in_fan_out``; a Llama with tied embeddings), lorakit's initial A / B / magnitude are copied into peft's modules,
one batch runs through both, and the loss and every adapter parameter's gradient are compared element by element
with the shared tolerance table (conftest.TOLERANCE), in float32 and float64. Measured (2026-11-30, CPU, torch 2.13):
float32 gradients differ by at most 4e-7 of their largest value, float64 by at most 6e-16 (the losses are equal).

Found here: a float64 model got float32 adapters, and DoRA formed its weight norm in float32, so float64 gradients
differed from peft's by ~1e-7 (the table's float64 rtol is 1e-10). Deliberate differences in LoRA+'s parameter
groups are documented in lorakit.optim and tested to stay as documented.
"""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file

import lorakit
from conftest import assert_close
from lorakit.inject import adapter_hosts, lora_layers
from lorakit.layers import LoraEmbedding, ModulesToSave
from lorakit.optim import build_optimizer, param_groups
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


@pytest.mark.parametrize("variant,dropout", [("lora", 0.0), ("dora", 0.1)])
def test_gradient_checkpointing_gives_equal_gradients(variant, dropout):
    """On and off, the same gradients; with dropout too (the recomputation replays the forward's generator state)."""
    ours, _, pairs = twins("llama", torch.float64, variant=variant, dropout=dropout)
    plain = loss_and_backward(ours)
    grads = [mine.grad.clone() for _, mine, _ in pairs]
    ours.zero_grad(set_to_none=True)
    if hasattr(ours, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        ours.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    ours.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    assert_close(loss_and_backward(ours), plain)
    assert len(calls) == 2  # the layer ran again in the backward: checkpointing was on
    for (name, mine, _), expected in zip(pairs, grads):
        assert_close(mine.grad, expected, msg=f"checkpointed gradient of {name}")


def adamw_steps(model, optimizer, steps: int = 3) -> None:
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_and_backward(model, seed=step)
        optimizer.step()


@pytest.mark.parametrize("variant,decay", [("lora", 0.1), ("dora", 0.0)])
def test_loraplus_three_adamw_steps_equal_peft(variant, decay):
    """lora_A at lr, lora_B and DoRA's magnitude at ratio x lr, matrices decayed: peft's create_loraplus_optimizer
    (whose decay is ``loraplus_weight_decay``) gives the same adapters after 3 AdamW steps."""
    ours, theirs, pairs = twins("llama", torch.float64, variant=variant, targets=("q_proj", "v_proj"))
    adamw_steps(ours, build_optimizer(ours, lr=1e-2, weight_decay=decay, loraplus_ratio=16))
    adamw_steps(theirs, create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16,
                                                  loraplus_weight_decay=decay))
    for name, mine, peft_tensor in pairs:
        assert_close(mine.detach(), peft_tensor.detach(), msg=f"{name} after 3 steps")


def groups_of(groups, names) -> dict[str, tuple[float, float]]:
    """parameter name -> (lr, weight decay), from optimizer param groups."""
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_loraplus_differences_from_peft_stay_as_documented():
    """lorakit.optim's docstring: (1) 1-D tensors (DoRA's magnitude, copied norms) are never decayed, where peft
    decays every one not named bias; (2) an embedding adapter has no learning rate of its own (lora_B at ratio x lr,
    lora_A at lr, as on any layer), where peft gives both ``loraplus_lr_embedding`` (default 1e-6). Everything else
    is in the same group on both sides."""
    ours, theirs, pairs = twins("llama", torch.float64, variant="dora", targets=("q_proj", "embed_tokens"),
                                modules_to_save=["norm"])
    mine = groups_of(param_groups(ours, lr=1e-3, weight_decay=0.1, loraplus_ratio=16),
                     {id(p): n for n, p in ours.named_parameters()})
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.1)
    theirs_by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    ours_names = {id(p): n for n, p in ours.named_parameters()}
    seen = set()
    for name, mine_tensor, peft_tensor in pairs:
        ours_lr_decay, peft_lr_decay = mine[ours_names[id(mine_tensor)]], theirs_by_id[id(peft_tensor)]
        if name.startswith("model.embed_tokens.") and mine_tensor.ndim == 2:
            assert peft_lr_decay == (1e-6, 0.1), name
            assert ours_lr_decay == ((16e-3, 0.1) if name.endswith(".B") else (1e-3, 0.1)), name
            seen.add("embedding")
        elif mine_tensor.ndim == 1:  # magnitudes, and the copied RMSNorm weights (peft: not nn.LayerNorm, decayed)
            assert peft_lr_decay == (16e-3, 0.1) and ours_lr_decay == (16e-3, 0.0), name
            seen.add("magnitude" if name.endswith("magnitude") else "norm")
        else:
            assert ours_lr_decay == peft_lr_decay, name
            seen.add("same")
    assert seen == {"embedding", "magnitude", "norm", "same"}


@pytest.mark.parametrize("kind,targets", [("llama", ("q_proj", "down_proj")), ("gpt2", ("c_attn", "c_fc"))])
def test_pissa_start_and_residual_base_equal_peft(kind, targets, tmp_path):
    """init='pissa': A, B and the residual base weight W - s B A equal peft's (both take a float32 SVD), and the
    saved adapter is the rank-2r plain LoRA for the original base that peft writes with
    ``path_initial_model_for_weight_conversion``: the same tensors (lorakit needs no initial copy: it keeps A0, B0)."""
    ours, theirs, pairs = twins(kind, torch.float32, targets=targets, init="pissa", random_b=False)
    for name, mine, peft_tensor in pairs:
        assert_close(mine.detach(), peft_tensor.detach(), msg=f"PiSSA start of {name}")
    inner = theirs.base_model.model
    for path, host in lora_layers(ours).items():
        assert_close(host.base_layer.weight.detach(), inner.get_submodule(path).base_layer.weight.detach(),
                     msg=f"residual base of {path}")
    theirs.peft_config["default"].init_lora_weights = True  # peft's own recipe: save the start, as plain LoRA
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training" moves A and B, the same in both
        gen = torch.Generator().manual_seed(5)
        for _, mine, peft_tensor in pairs:
            mine.add_(0.01 * torch.randn(mine.shape, generator=gen, dtype=mine.dtype))
            peft_tensor.copy_(mine)
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=tmp_path / "initial")
    mine_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert mine_file.keys() == peft_file.keys()
    for key in peft_file:
        assert_close(mine_file[key], peft_file[key], msg=key)
    for folder in ("ours", "peft"):
        saved = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True


def test_olora_is_not_an_init_of_lorakit_and_says_so():
    """peft's init_lora_weights='olora' (QR of W) is not offered (lorakit's inits: default, gaussian, pissa); an
    olora adapter saved by peft loads (test_peft_sweep). Asking for it is one clear line. (peft refuses pissa on a
    float64 model; lorakit takes the same float32 SVD there, so float32 is where the two are compared.)"""
    with pytest.raises(lorakit.LorakitError, match="unknown init 'olora'; choose one of default, gaussian, pissa"):
        lorakit.LoraConfig(r=4, init="olora")
