"""lorakit.decoding.StaticDecoder on the families beyond Llama (Phi-3 with whole or partial rotary, Gemma, Gemma 2,
Gemma 3 text) against transformers' own forward (lorakit.generation), row by row, float32, kernels under
TRITON_INTERPRET=1 (conftest).

Each family gets what makes it different made to matter: random norm weights (Gemma's ``1 + weight``, the extra
Gemma 2 norms, Gemma 3's q/k norms), soft-caps small enough to bend the logits, different rope bases, sliding
layers at the window's edge. Rows use different adapters (LoRA, rsLoRA on a few projections, DoRA) or none.
"""

from __future__ import annotations

import re

import pytest
import torch

import lorakit
from lorakit.decoding import StaticDecoder, static_decoding_unsupported
from lorakit.errors import LorakitError
from lorakit.generation import decode, prefill

ATOL = 1e-5  # float32, as tests/test_static_decoder.py
PROMPTS = [[5, 9, 2, 7, 1], [3, 4], [8, 8, 1, 2, 3, 4, 5], [11, 12, 13]]
NAMES = ["a", None, "d", "b"]
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _shake_norms(model, std=0.3):
    """Norm weights start at 0 (Gemma) or 1 (Llama, Phi-3): random ones make the offset and order matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(torch.randn_like(p) * std)
    return model


def _phi3(**extra):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(11)
    return _shake_norms(Phi3ForCausalLM(Phi3Config(**COMMON, pad_token_id=0, **extra)).eval())


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(12)  # head_dim 12: not hidden / heads (8)
    return _shake_norms(GemmaForCausalLM(GemmaConfig(**COMMON, head_dim=12)).eval())


def _sharpen(model, factor=30.0):
    """q/k weights x30: scores of several units, so that a soft-cap of 1.5 bends them (at init they are ~0.01)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


def _gemma2(**extra):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(13)
    config = dict(COMMON, num_hidden_layers=3, head_dim=12, query_pre_attn_scalar=20, attn_logit_softcapping=1.5,
                  final_logit_softcapping=0.5, sliding_window=16)
    config.update(extra)
    return _sharpen(_shake_norms(Gemma2ForCausalLM(Gemma2Config(**config)).eval()))


def _gemma3(**extra):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(14)
    config = dict(COMMON, num_hidden_layers=3, head_dim=12, query_pre_attn_scalar=20, sliding_window=16,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    config.update(extra)
    return _sharpen(_shake_norms(Gemma3ForCausalLM(Gemma3TextConfig(**config)).eval()))


def _phi3_partial():
    """Phi-4-mini's form: a part of each head rotates (here 4 of 8 dims), the rest passes."""
    return _phi3(partial_rotary_factor=0.5)


FAMILIES = {"phi3": _phi3, "phi3_partial": _phi3_partial, "gemma": _gemma, "gemma2": _gemma2, "gemma3_text": _gemma3}


def _with_adapters(model, family="llama"):
    """Adapters a (LoRA, every projection), b (rsLoRA, a few) and d (DoRA), with B and magnitudes moved off init."""
    few = ["qkv_proj", "down_proj"] if family.startswith("phi3") else ["q_proj", "v_proj", "down_proj"]
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=3, target_modules=few, variant="rslora"), adapter="b")
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=6, variant="dora"), adapter="d")
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if name.endswith(("lora_B", "magnitude")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _reference(model, prompts, names, steps):
    logits, batch = prefill(model, prompts, names)
    out = [logits]
    for _ in range(steps):
        out.append(decode(model, batch, out[-1].argmax(dim=-1).tolist(), names))
    return out


def _assert_steps(expected, got):
    for step, (e, g) in enumerate(zip(expected, got)):
        assert torch.allclose(g, e, atol=ATOL, rtol=1e-5), f"step {step}: max diff {(g - e).abs().max():.2e}"


@pytest.fixture
def references_only(monkeypatch):
    """The kernels' PyTorch references (the interpreter runs a decode step in seconds; the kernels themselves are
    checked against these references in tests/test_kernels_gemma.py and the kernel tests of the Llama path)."""
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


def _admit_and_step(model, decoder, rows, names, steps):
    logits, batch = prefill(model, PROMPTS, names)
    decoder.admit(rows, batch)
    got = [logits]
    for _ in range(steps):
        got.append(decoder.step(rows, got[-1].argmax(dim=-1).tolist(), names))
    return got


@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_decoder_with_kernels_matches_transformers(family):
    """The Triton kernels (interpreter) with the LoRA deltas added inside the next kernels: rope + KV store
    (Gemma), add + RMSNorm with Gemma's 1 + weight, GeGLU / SwiGLU; soft-capped attention (Gemma 2)."""
    names = ["a", None, "b", "a"]
    model = _with_adapters(FAMILIES[family](), family)
    assert static_decoding_unsupported(model, 16) is None
    expected = _reference(model, PROMPTS, names, steps=2)
    decoder = StaticDecoder(model, max_batch=4, max_len=16, lora_overlap="lora")
    _assert_steps(expected, _admit_and_step(model, decoder, [3, 0, 2, 1], names, steps=2))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_decoder_matches_transformers_in_every_mode(family, references_only):
    """admit (transformers' prefill) then 3 steps, and the decoder's own prefill then 3 steps on other rows, in
    both data flows, with DoRA among the rows' adapters."""
    model = _with_adapters(FAMILIES[family](), family)
    expected = _reference(model, PROMPTS, NAMES, steps=3)
    for overlap in ("off", "lora"):
        decoder = StaticDecoder(model, max_batch=9, max_len=16, lora_overlap=overlap)
        _assert_steps(expected, _admit_and_step(model, decoder, [4, 0, 2, 5], NAMES, steps=3))
        rows = [1, 3, 6, 8]
        own = [decoder.prefill(rows, PROMPTS, NAMES)]
        for _ in range(3):
            own.append(decoder.step(rows, own[-1].argmax(dim=-1).tolist(), NAMES))
        _assert_steps(expected, own)
    # the adapters matter: the base model's logits differ by far more than the tolerance
    with lorakit.disable_adapters(model):
        base = _reference(model, PROMPTS, [None] * 4, steps=0)[0]
    assert (base[0] - expected[0][0]).abs().max() > 100 * ATOL


def test_long_prompts_prefill_with_soft_capped_causal_attention(references_only, monkeypatch):
    """Prompts past PREFILL_KERNEL_MAX_PROMPT attend per prompt in PyTorch: SDPA has no soft-cap, so that path
    computes it itself (Gemma 2's cap of 1.5 bends every score here)."""
    import lorakit.decoding.decoder as decoder_module

    monkeypatch.setattr(decoder_module, "PREFILL_KERNEL_MAX_PROMPT", 0)
    model = _with_adapters(_gemma2(), "gemma2")
    expected = _reference(model, PROMPTS, NAMES, steps=1)
    decoder = StaticDecoder(model, max_batch=4, max_len=16)
    got = [decoder.prefill([0, 1, 2, 3], PROMPTS, NAMES)]
    got.append(decoder.step([0, 1, 2, 3], got[0].argmax(dim=-1).tolist(), NAMES))
    _assert_steps(expected, got)


def test_gemma_features_are_really_exercised():
    """The reference really depends on what the decoder reproduces: soft-caps, the embedding scale, two rope bases."""
    gemma2 = _gemma2()
    ids = torch.tensor([PROMPTS[2]])
    capped = gemma2(input_ids=ids).logits
    assert capped.abs().max() <= 0.5 + 1e-6  # the final cap of 0.5 holds
    for layer in gemma2.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (gemma2(input_ids=ids).logits - capped).abs().max() > 1e-3  # the attention cap of 1.5 bends scores
    gemma3 = _gemma3()
    decoder = StaticDecoder(gemma3, max_batch=1, max_len=8)
    local, full = decoder._rope["sliding_attention"][0], decoder._rope["full_attention"][0]
    assert (local - full).abs().max() > 0.1 and decoder.parts.layers[1].rope == "full_attention"
    assert decoder.parts.embed_scale == pytest.approx(32 ** 0.5, rel=1e-6)


def test_phi3_fused_modules_are_one_group_each():
    model = _with_adapters(_phi3(), "phi3")
    decoder = StaticDecoder(model, max_batch=2, max_len=8, lora_overlap="lora")
    stack = decoder.adapters.layers[0]["qkv"]
    assert decoder.weights[0]["qkv"].splits == (4 * 8 + 2 * 2 * 8,) and stack.rank.shape[1] == 1
    assert not decoder._fused_qkv(0)  # rope + store expands three q/k/v segments, Phi-3 has one
    assert decoder.weights[0]["gate_up"].splits == (2 * 48,)


def test_sliding_layers_decode_up_to_the_window_and_refuse_past_it(references_only):
    window = 10
    model = _with_adapters(_gemma2(sliding_window=window), "gemma2")
    expected = _reference(model, PROMPTS, NAMES, steps=3)  # the longest row reaches 10 tokens
    decoder = StaticDecoder(model, max_batch=4, max_len=window)
    _assert_steps(expected, _admit_and_step(model, decoder, [0, 1, 2, 3], NAMES, steps=3))
    # the boundary is where it is said to be: a window one shorter changes the last step in transformers
    for layer in model.model.layers:
        if layer.self_attn.sliding_window:
            layer.self_attn.sliding_window = window - 1
    model.config.sliding_window = window - 1
    shorter = _reference(model, PROMPTS, NAMES, steps=3)
    assert (shorter[-1][2] - expected[-1][2]).abs().max() > 100 * ATOL
    model.config.sliding_window = window
    reason = static_decoding_unsupported(model, window + 1)
    assert "sliding_window=10" in reason and "not 11" in reason and "\n" not in reason
    phi3 = _with_adapters(_phi3(sliding_window=window), "phi3")
    assert "sliding_window=10" in static_decoding_unsupported(phi3, window + 1)
    expected = _reference(phi3, PROMPTS, NAMES, steps=3)
    decoder = StaticDecoder(phi3, max_batch=4, max_len=window)
    _assert_steps(expected, _admit_and_step(phi3, decoder, [0, 1, 2, 3], NAMES, steps=3))


def test_unsupported_variants_get_one_line_reasons():
    cases = [
        (_phi3(partial_rotary_factor=0.125), 16, "rotates 1 of 8 (partial_rotary_factor=0.125)"),
        (_phi3(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                "long_factor": [2.0] * 4}, original_max_position_embeddings=32), 64,
         "original_max_position_embeddings=32, not 64"),
        (_gemma3(use_bidirectional_attention=True), 16, "bidirectionally"),
        (_gemma3(hidden_activation="gelu"), 16, "not 'gelu'"),
        (_gemma3(attn_logit_softcapping=50.0), 16, "attn_logit_softcapping"),
    ]
    for model, max_len, message in cases:
        reason = static_decoding_unsupported(model, max_len)
        assert reason is not None and message in reason and "\n" not in reason, reason
        with pytest.raises(LorakitError, match=re.escape(message)):
            StaticDecoder(model, max_batch=1, max_len=max_len)


def test_phi3_longrope_within_the_original_context_is_exact(references_only):
    """longrope's table uses the short factors while every position is below the original context."""
    factors = [1.0, 1.5, 2.0, 3.0]
    model = _with_adapters(_phi3(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                  "short_factor": factors, "long_factor": [4.0] * 4},
                                        original_max_position_embeddings=16), "phi3")
    expected = _reference(model, PROMPTS, NAMES, steps=2)
    decoder = StaticDecoder(model, max_batch=4, max_len=16)
    got = [decoder.prefill([0, 1, 2, 3], PROMPTS, NAMES)]
    for _ in range(2):
        got.append(decoder.step([0, 1, 2, 3], got[-1].argmax(dim=-1).tolist(), NAMES))
    _assert_steps(expected, got)
