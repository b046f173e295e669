"""use_fast_kernels on tiny transformers models (CPU, Triton interpreter): same loss and LoRA gradients as the
unmodified model, same state-dict keys, checkpointing still works, clean refusal and undo."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.kernels.rmsnorm import FusedRMSNorm
from lorakit.kernels.swiglu import FusedSwiGLUMLP
from lorakit.models.fast import causal_lm_loss, disable_fast_kernels, use_fast_kernels

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(model):
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    torch.manual_seed(3)
    for name, p in model.named_parameters():  # non-zero B so every LoRA gradient is exercised
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model.train()


def _randomize_b(model):
    torch.manual_seed(4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)


def _loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _batch(vocab=128):
    ids = torch.randint(0, vocab, (2, 13))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    return ids, labels


def _other_model(kind):
    import transformers

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    if kind == "gemma":
        return transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=8, **common))
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                                          **common))
    if kind == "qwen2_moe":  # routed experts plus a shared SwiGLU expert (fused) per layer
        return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=48,
            **common))
    return tiny_llama()


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral", "gemma", "mixtral", "qwen2_moe"])
def test_same_loss_and_lora_grads(kind):
    torch.manual_seed(0)
    model = _lora_model(_other_model(kind))
    if kind in ("mixtral", "qwen2_moe") and not any(p.ndim == 3 for p in model.parameters()):
        pytest.skip("MoE experts are fused 3-D parameters only in transformers >= 5 (4.x: one nn.Linear per expert)")
    if kind in ("mixtral", "qwen2_moe"):  # the experts (3-D parameters) too, as --target-parameters adapts them
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=[], target_parameters=[
            "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), adapter="experts")
        lorakit.set_adapter(model, ["default", "experts"])
        _randomize_b(model)
    ids, labels = _batch()
    ref_out, ref_grads = _loss_and_grads(model, ids, labels)
    keys = set(model.state_dict())
    report = use_fast_kernels(model, require_cuda=False)
    assert report.applied and report.fused_loss, str(report)
    expected_norms = 2 * 2 + 1 + (2 * 2 if kind == "qwen3" else 0)  # 2 per layer + final (+ q/k norms)
    assert report.rms_norms == expected_norms
    # Gemma's MLP is GeGLU and Mixtral has only experts: left as they are; Qwen2-MoE's shared expert is fused
    assert report.mlps == (0 if kind in ("gemma", "mixtral") else 2)
    assert set(model.state_dict()) == keys
    out, grads = _loss_and_grads(model, ids, labels)
    assert out.logits is None  # never built
    assert_close(out.loss, ref_out.loss)
    moe = kind in ("mixtral", "qwen2_moe")
    # Mixtral's MLP is its experts: no gate/up/down Linear for "default"; the expert adapter adds 2 x (A, B) per layer
    linear_targets = 4 if kind == "mixtral" else 7
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * linear_targets * 2 + (2 * 2 * 2 if moe else 0)
    for name in grads:
        assert_close(grads[name], ref_grads[name], msg=name)


def test_checkpointing_num_items_and_no_grad_paths():
    model = _lora_model(tiny_llama())
    ids, labels = _batch()
    ref_out, ref_grads = _loss_and_grads(model, ids, labels, num_items_in_batch=torch.tensor(7))
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
    use_fast_kernels(model, require_cuda=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out, grads = _loss_and_grads(model, ids, labels, num_items_in_batch=torch.tensor(7))
    assert_close(out.loss, ref_out.loss)
    for name in grads:
        assert_close(grads[name], ref_grads[name], msg=name)
    with torch.no_grad():  # evaluation keeps its logits
        out = model(input_ids=ids, labels=labels)
    assert_close(out.logits, ref_logits)
    n_valid = (labels[:, 1:] != -100).sum()  # the reference loss above was a sum divided by 7
    assert_close(out.loss, ref_out.loss * 7 / n_valid)
    hidden = model.model(input_ids=ids).last_hidden_state
    assert_close(causal_lm_loss(hidden, model.lm_head.weight, labels), out.loss)


def test_tuple_output_and_inject_after():
    model = tiny_llama().train()
    use_fast_kernels(model, require_cuda=False)
    _lora_model(model)  # LoRA wraps the projections inside the fused MLP under the same paths
    assert isinstance(model.model.layers[0].mlp, FusedSwiGLUMLP)
    assert isinstance(model.model.layers[0].mlp.gate_proj, lorakit.layers.LoraLinear)
    ids, labels = _batch()
    out = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].requires_grad


def test_refuses_cleanly():
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    report = use_fast_kernels(model)  # on CPU: nothing changes
    assert not report.applied and "CUDA" in report.reason
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    report = use_fast_kernels(gpt2, require_cuda=False)
    assert not report.applied and "gpt2" in report.reason
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_lora_on_lm_head_keeps_the_original_loss():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["lm_head"]))
    report = use_fast_kernels(model, require_cuda=False)
    assert report.applied and not report.fused_loss and "lm_head" in report.reason
    assert model(input_ids=_batch()[0], labels=_batch()[1]).logits is not None


def test_disable_restores_everything():
    model = tiny_llama().train()
    ids, labels = _batch()
    ref = model(input_ids=ids, labels=labels).loss
    use_fast_kernels(model, require_cuda=False)
    use_fast_kernels(model, require_cuda=False)  # twice is harmless
    assert sum(isinstance(m, FusedRMSNorm) for m in model.modules()) == 5
    disable_fast_kernels(model)
    assert not any(isinstance(m, (FusedRMSNorm, FusedSwiGLUMLP)) for m in model.modules())
    out = model(input_ids=ids, labels=labels)
    assert out.logits is not None
    assert_close(out.loss, ref)


def test_router_auxiliary_loss_keeps_the_original_forward():
    """A MoE model asked for its router's auxiliary loss (config or call) gets the original loss, which adds it;
    the fused loss would silently leave it out."""
    torch.manual_seed(0)
    model = _lora_model(_other_model("mixtral"))
    ids, labels = _batch()
    reference, _ = _loss_and_grads(model, ids, labels, output_router_logits=True)
    plain, _ = _loss_and_grads(model, ids, labels)
    assert (reference.loss - plain.loss).abs() > 1e-6  # the auxiliary loss is there to lose
    assert use_fast_kernels(model, require_cuda=False).fused_loss
    out, _ = _loss_and_grads(model, ids, labels, output_router_logits=True)
    assert out.logits is not None  # the original forward ran
    assert_close(out.loss, reference.loss)
    disable_fast_kernels(model)
    model.config.output_router_logits = True
    report = use_fast_kernels(model, require_cuda=False)
    assert report.applied and not report.fused_loss and "output_router_logits" in report.reason
