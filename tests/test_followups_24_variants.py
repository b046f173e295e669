"""LoRA variants against the real peft package (0.21), element by element (follow-ups 24, "variants").

Measured here (2026-12-02, CPU, torch 2.13), in float64 with lorakit's adapter tensors copied into peft's: loss and
logits equal, every gradient of A, B and DoRA's magnitude within 3e-15 of its largest value, for LoRA / rsLoRA / DoRA /
rsDoRA on Llama, Qwen2 (q/k/v biases), Gemma and Gemma 2 (scaled, tied embeddings; DoRA on the embedding), Phi-3
(fused qkv_proj / gate_up_proj), GPT-2 (Conv1D), with dropout 0.3 in train mode, rank_pattern / alpha_pattern (with
rsLoRA too), modules_to_save; Qwen2-MoE and Mixtral experts (target_parameters) within 3e-7 in float32 (grouped_mm
has no float64). PiSSA starts agree with peft's to float32 rounding; gradient checkpointing (reentrant or not) gives
the same gradients. test_newuser_audit_14_variants covers Llama / GPT-2, LoRA+ groups and PiSSA files.

Found here: a DoRA adapter active after another adapter (``set_adapter(model, ["a", "b"])``) took ``x W^T`` as its
base term, so the earlier adapters' output was not rescaled by ``m / ||W + s B A||`` as in peft, while lorakit's merge
did rescale it: on random adapters the unmerged logits differed from peft's, and from lorakit's own merged model, by
~100% of their size. A merge after another merge also took DoRA's norm of the already merged weight.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers as tf
from peft.utils import get_peft_model_state_dict

import lorakit
from conftest import assert_close
from lorakit.io import adapter_state_dict

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    models = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **SMALL)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **SMALL)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **SMALL)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                                         bos_token_id=1, **SMALL)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                                         bos_token_id=0, eos_token_id=0)),
        "qwen2moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            shared_expert_intermediate_size=24, **SMALL)),
    }
    return models[kind]().eval()


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """B (and an embedding's zero A) random, magnitudes moved off ||W||: every adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if name.endswith("lora_B") or (name.endswith("lora_A") and not p.any()):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("magnitude"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))


def by_key(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """File key -> the trainable parameter it was read from (state dicts hold detached views of them)."""
    params = {p.data_ptr(): p for p in model.parameters() if p.requires_grad}
    return {key: params[t.data_ptr()] for key, t in state.items() if t.data_ptr() in params}


def peft_config(config: lorakit.LoraConfig, kind: str) -> peft.LoraConfig:
    return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                           target_modules=config.target_modules, target_parameters=config.target_parameters,
                           rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern,
                           modules_to_save=config.modules_to_save, use_rslora=config.variant in ("rslora", "rsdora"),
                           use_dora=config.variant in ("dora", "rsdora"), init_lora_weights=False,
                           fan_in_fan_out=kind == "gpt2")


def twins(kind: str, config: lorakit.LoraConfig, dtype: torch.dtype):
    """(lorakit model, peft model, [(file key, lorakit param, peft param)]): equal bases, equal adapter tensors."""
    base = build(kind).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on tied embeddings
        theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(config, kind))
    ours = lorakit.inject(base, config)
    randomize(ours)
    mine, their = by_key(adapter_state_dict(ours)[0], ours), by_key(get_peft_model_state_dict(theirs), theirs)
    assert mine.keys() == their.keys() and mine
    with torch.no_grad():
        for key, p in mine.items():
            their[key].copy_(p)
    return ours, theirs, [(key, mine[key], their[key]) for key in sorted(mine)]


def loss_and_backward(model: torch.nn.Module) -> torch.Tensor:
    model.train()
    torch.manual_seed(0)  # the same dropout masks on both sides (one per layer, drawn in the same order)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach()


CASES = {
    "qwen2-biases-rsdora-dropout": ("qwen2", dict(variant="rsdora", target_modules="all-linear", dropout=0.3)),
    "gemma-embedding-dora": ("gemma", dict(variant="dora", target_modules=["q_proj", "embed_tokens", "down_proj"])),
    "phi3-fused-dora-dropout": ("phi3", dict(variant="dora", target_modules="all-linear", dropout=0.2)),
    "gpt2-rslora-patterns": ("gpt2", dict(variant="rslora", target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 7},
                                          alpha_pattern={"h.0.attn.c_attn": 1.5})),
    "llama-dora-patterns-copies": ("llama", dict(variant="dora", target_modules=["q_proj", "v_proj", "down_proj"],
                                                 rank_pattern={"^model.layers.0.self_attn.q_proj": 2},
                                                 alpha_pattern={r"layers\.1\..*": 3.0}, modules_to_save=["norm"])),
    "qwen2moe-experts-patterns": ("qwen2moe", dict(target_modules=["q_proj"], target_parameters=[
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj"], rank_pattern={"layers.1.mlp.experts.down_proj": 2},
        alpha_pattern={"gate_up_proj": 3.0})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_every_gradient_equal_peft_across_families(case):
    kind, options = CASES[case]
    dtype = torch.float32 if kind == "qwen2moe" else torch.float64  # torch's grouped_mm (the experts) has no float64
    ours, theirs, pairs = twins(kind, lorakit.LoraConfig(r=4, alpha=8, **options), dtype)
    assert_close(loss_and_backward(ours), loss_and_backward(theirs))
    for key, mine, peft_tensor in pairs:
        assert mine.grad is not None and mine.grad.abs().max() > 0, key
        assert_close(mine.grad, peft_tensor.grad, msg=f"{case}: gradient of {key}")


def stacked(order: tuple[str, ...], tmp_path, targets=("q_proj", "v_proj", "embed_tokens")):
    """A float64 Llama with adapters a0, a1, ... of the variants in ``order``, all active in that order, and peft's
    PeftModel of the same files, likewise all active."""
    model = build("llama").double()
    for index, variant in enumerate(order):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant=variant, target_modules=list(targets)),
                       adapter=f"a{index}")
    randomize(model)
    names = [f"a{index}" for index in range(len(order))]
    for name in names:
        lorakit.save_adapter(model, tmp_path / name, adapter=name)
    lorakit.set_adapter(model, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build("llama").double(), tmp_path / "a0", adapter_name="a0",
                                                is_trainable=True)
        for name in names[1:]:
            theirs.load_adapter(tmp_path / name, adapter_name=name, is_trainable=True)
    theirs.base_model.set_adapter(names)
    return model, theirs, names


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("order", [("lora", "dora"), ("dora", "rsdora"), ("dora", "lora", "dora")])
def test_dora_after_other_active_adapters_equals_peft_and_its_own_merge(order, tmp_path):
    """peft's DoRA takes the output so far (bias removed) as its base term, so a DoRA adapter rescales the adapters
    active before it: ``y - b = r (x (W + delta_a) + s x A^T B^T)``, ``r = m / ||W + s B A||``, which is what merging
    a then b gives. lorakit took ``x W^T`` (a sum of independent updates): its unmerged logits differed from peft's,
    and from its own merged model's, by ~100%."""
    ours, theirs, names = stacked(order, tmp_path)
    unmerged = logits(ours)
    assert_close(unmerged, logits(theirs))
    lorakit.merge(ours, names[0])  # the first merged, the others running over it: the same model
    assert_close(logits(ours), unmerged, dtype=torch.float32)  # merges are computed in float32
    lorakit.merge(ours)
    assert_close(logits(ours), unmerged, dtype=torch.float32)
    lorakit.unmerge(ours)
    assert_close(logits(ours), unmerged, dtype=torch.float32)


def test_stacked_dora_trains_as_in_peft(tmp_path):
    """The gradients of a DoRA adapter trained over another active adapter (no dropout: peft's output-so-far rule)."""
    ours, theirs, names = stacked(("lora", "dora"), tmp_path, targets=("q_proj", "down_proj"))
    assert_close(loss_and_backward(ours), loss_and_backward(theirs))
    for name in names:
        mine = by_key(adapter_state_dict(ours, name)[0], ours)
        their = by_key(get_peft_model_state_dict(theirs, adapter_name=name), theirs)
        assert mine.keys() == their.keys() and mine
        for key in mine:
            assert_close(mine[key].grad, their[key].grad, msg=f"{name}: gradient of {key}")
