"""DoRA on embeddings (PEFT's ``DoraEmbeddingLayer``): the naive float64 formula, gradients, merge, and PEFT files
both ways; scaled embeddings (Gemma's ``embed_scale``) for LoRA and DoRA."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from conftest import TOLERANCE, assert_close, tiny_llama
from lorakit.layers import LoraEmbedding


def dora_embedding(dtype=torch.float32, num=37, dim=11, rank=3, seed=0) -> LoraEmbedding:
    """A DoRA embedding with random A, B and a perturbed magnitude (odd sizes, a padding row)."""
    torch.manual_seed(seed)
    layer = LoraEmbedding(nn.Embedding(num, dim, padding_idx=0).to(dtype).requires_grad_(False))
    adapter = layer.add_adapter("default", rank, 5.0, "dora", 0.0, "default")
    with torch.no_grad():
        adapter.lora_A.normal_(std=0.5)
        adapter.lora_B.normal_(std=0.5)
        adapter.magnitude.mul_(1 + 0.2 * torch.randn_like(adapter.magnitude))
    layer.set_active(["default"])
    return layer


def naive(layer: LoraEmbedding, ids: torch.Tensor, detach_norm: bool = True) -> torch.Tensor:
    """DoRA written out on the linear form W = E^T (dim, num) in float64: y = (m / ||W + s B A||_row) (W + s B A)[:, ids]."""
    ad = layer.adapters["default"]
    A, B, m = (t.double() for t in (ad.lora_A, ad.lora_B, ad.magnitude))
    adapted = layer.base_layer.weight.double().T + ad.scaling * B @ A  # (dim, num)
    norm = torch.linalg.vector_norm(adapted, dim=1)  # per embedding dimension, over the vocabulary
    if detach_norm:
        norm = norm.detach()
    return F.embedding(ids, (adapted * (m / norm).unsqueeze(1)).T)


def test_magnitude_starts_as_the_column_norms_and_output_equals_base():
    layer = LoraEmbedding(nn.Embedding(37, 11))
    adapter = layer.add_adapter("default", 3, 5.0, "dora", 0.0, "default")
    layer.set_active(["default"])
    assert adapter.magnitude.shape == (11,)
    torch.testing.assert_close(adapter.magnitude, layer.base_layer.weight.norm(dim=0))
    ids = torch.randint(0, 37, (3, 5))
    assert_close(layer(ids), layer.base_layer(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_gradients_match_the_naive_formula(dtype):
    layer = dora_embedding(dtype)
    ids = torch.tensor([[0, 5, 36, 5], [1, 2, 3, 17]])
    out = layer(ids)
    assert out.dtype == dtype
    expected = naive(layer, ids)
    assert_close(out, expected)
    weight = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * weight).sum().backward()
    ad = layer.adapters["default"]
    params = [ad.lora_A, ad.lora_B, ad.magnitude]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    expected_grads = list(torch.autograd.grad((naive(layer, ids) * weight).sum(), params))
    # the padding row gets no gradient (F.embedding's padding_idx, as in PEFT): the naive formula ignores padding
    assert torch.count_nonzero(grads[0][:, 0]) == 0
    grads[0], expected_grads[0] = grads[0][:, 1:], expected_grads[0][:, 1:]
    rtol, atol = TOLERANCE[dtype]
    for name, got, want in zip(("lora_A", "lora_B", "magnitude"), grads, expected_grads):
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * max(1.0, want.abs().max().item()), msg=name)
    assert layer.base_layer.weight.grad is None
    # the norm is detached (PEFT, DoRA paper section 4.3): the gradient differs from the non-detached formula
    attached = torch.autograd.grad((naive(layer, ids, detach_norm=False) * weight).sum(), [ad.lora_B])[0]
    assert (attached - expected_grads[1]).abs().max() > 1e-3


def test_merge_unmerge_roundtrip():
    layer = dora_embedding()
    ids = torch.randint(0, 37, (4, 6))
    before = layer.base_layer.weight.detach().clone()
    expected = layer(ids)
    layer.merge("default")
    assert_close(layer.base_layer(ids), expected)
    assert_close(layer(ids), expected)  # a merged adapter is not applied twice
    layer.unmerge()
    assert_close(layer.base_layer.weight, before)
    assert_close(layer(ids), expected)


def _randomize_peft(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def test_peft_files_both_ways_and_equal_gradients(tmp_path):
    """PEFT's embedding DoRA saved, loaded here (equal logits and gradients), merged, saved back, loaded in PEFT."""
    ids = torch.randint(0, 128, (2, 9))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True)
    theirs = peft.get_peft_model(tiny_llama(), config)
    _randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_llama()
    lorakit.load_adapter(ours, tmp_path / "peft", trainable=True)
    assert ours.model.embed_tokens.adapters["default"].magnitude.shape == (32,)

    their_logits, our_logits = theirs(ids).logits, ours(ids).logits
    assert_close(our_logits, their_logits)
    their_logits.square().mean().backward()
    our_logits.square().mean().backward()
    emb = theirs.base_model.model.model.embed_tokens
    adapter = ours.model.embed_tokens.adapters["default"]
    for got, want in ((adapter.lora_A.grad, emb.lora_embedding_A["default"].grad),
                      (adapter.lora_B.grad, emb.lora_embedding_B["default"].grad),
                      (adapter.magnitude.grad, emb.lora_magnitude_vector["default"].weight.grad)):
        assert want.abs().max() > 0
        assert_close(got, want)

    lorakit.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = ours(ids).logits
        assert_close(again(ids).logits, expected)
        lorakit.merge(ours)
        assert_close(ours(ids).logits, expected)
        assert_close(again.merge_and_unload()(ids).logits, expected)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_scaled_embedding_gemma_matches_peft_and_merge(variant, tmp_path):
    """Gemma's embedding multiplies its lookups by sqrt(hidden) inside forward; the adapter's output must be too."""
    import transformers as tf

    def build():
        torch.manual_seed(0)
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                                    tie_word_embeddings=False)).eval()

    ids = torch.randint(0, 64, (2, 5))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"], use_dora=variant == "dora")
    theirs = peft.get_peft_model(build(), config).eval()
    _randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    ours = build()
    lorakit.load_adapter(ours, tmp_path)
    with torch.no_grad():
        expected = theirs(ids).logits
        assert_close(ours(ids).logits, expected)
        lorakit.merge(ours)
        assert_close(ours(ids).logits, expected)
