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
    # eager: the reference must soft-cap its attention (transformers 4.x's default sdpa silently does not)
    return _sharpen(_shake_norms(Gemma2ForCausalLM(Gemma2Config(**config, attn_implementation="eager")).eval()))


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


# -- sliding windows past their size ----------------------------------------------------------------------------

def _mistral(**extra):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(15)
    config = dict(COMMON, sliding_window=6)
    config.update(extra)
    return _sharpen(_shake_norms(MistralForCausalLM(MistralConfig(**config)).eval()))


def _qwen2(**extra):
    """Qwen2 with use_sliding_window: layers from max_window_layers on slide (here layers 1 and 2 of 3)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(16)
    config = dict(COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    config.update(extra)
    return _sharpen(_shake_norms(Qwen2ForCausalLM(Qwen2Config(**config)).eval()))


# each family with a window shorter than some prompts and than every row after a few steps; expected per-layer windows
SLIDING = {
    "mistral": (lambda: _mistral(), [6, 6]),
    "qwen2": (lambda: _qwen2(), [None, 5, 5]),
    "phi3": (lambda: _phi3(sliding_window=7), [7, 7]),
    "gemma2": (lambda: _gemma2(sliding_window=6), [6, None, 6]),
    "gemma3_text": (lambda: _gemma3(sliding_window=5), [5, None, 5]),
}
# lengths 11, 2, 8, 6 against windows 5..7: prompts shorter and longer than the window
LONG_PROMPTS = [[5, 9, 2, 7, 1, 30, 31, 32, 33, 34, 35], [3, 4], [8, 8, 1, 2, 3, 4, 5, 40], [11, 12, 13, 14, 15, 16]]


def _forward_each(model, sequences, names):
    """transformers' own forward over each whole sequence alone (no cache, no padding; lorakit routes the row's
    adapter): the next-token logits (rows, V) float32."""
    return torch.cat([prefill(model, [seq], [name])[0] for seq, name in zip(sequences, names)])


def _grow_and_compare(model, decoder, rows, prompts, names, steps, first=None):
    """The decoder's prefill (or ``first``: logits of rows already admitted), then ``steps`` greedy steps, each
    compared with transformers' forward over the whole sequence so far."""
    sequences = [list(p) for p in prompts]
    got = decoder.prefill(rows, prompts, names) if first is None else first
    for step in range(steps + 1):
        expected = _forward_each(model, sequences, names)
        assert torch.allclose(got, expected, atol=ATOL, rtol=1e-5), \
            f"step {step} (lengths {[len(s) for s in sequences]}): max diff {(got - expected).abs().max():.2e}"
        if step == steps:
            return got
        tokens = got.argmax(dim=-1).tolist()
        for seq, token in zip(sequences, tokens):
            seq.append(token)
        got = decoder.step(rows, tokens, names)


@pytest.mark.parametrize("family", list(SLIDING))
def test_sliding_window_layers_are_exact_past_the_window(family, references_only, monkeypatch):
    """Prompts shorter and longer than the window, rows growing to about 3 windows, through the decoder's own
    prefill (both its attention paths: the decode kernels' references, and per-prompt attention by blocks of
    queries for long prompts) against transformers' forward; and the window really matters there."""
    import lorakit.decoding.decoder as decoder_module

    build, windows = SLIDING[family]
    model = _with_adapters(build(), family)
    assert static_decoding_unsupported(model, 4096) is None
    decoder = StaticDecoder(model, max_batch=5, max_len=24)
    assert [layer.window for layer in decoder.parts.layers] == windows
    _grow_and_compare(model, decoder, [4, 0, 2, 1], LONG_PROMPTS, NAMES, steps=7)
    monkeypatch.setattr(decoder_module, "PREFILL_KERNEL_MAX_PROMPT", 0)  # prompts attend per prompt in PyTorch,
    monkeypatch.setattr(decoder_module, "PREFILL_ATTENTION_BLOCK", 3)  # by blocks of 3 queries over their keys
    decoder = StaticDecoder(model, max_batch=4, max_len=24, lora_overlap="lora")
    _grow_and_compare(model, decoder, [0, 1, 2, 3], LONG_PROMPTS, NAMES, steps=2)
    # the window matters: 2 keys more change transformers' logits of the 11-token prompt, and the decoder follows
    before = _forward_each(model, LONG_PROMPTS, NAMES)
    window = next(w for w in windows if w)
    model.config.sliding_window = window + 2
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = window + 2
    after = _forward_each(model, LONG_PROMPTS, NAMES)
    assert (after[0] - before[0]).abs().max() > 100 * ATOL
    wider = StaticDecoder(model, max_batch=4, max_len=24)
    assert [layer.window for layer in wider.parts.layers] == [w and window + 2 for w in windows]
    assert torch.allclose(wider.prefill([0, 1, 2, 3], LONG_PROMPTS, NAMES), after, atol=ATOL, rtol=1e-5)


def test_sliding_window_kernels_match_transformers_past_the_window():
    """The Triton kernels (interpreter), Gemma 3 (local and global layers, two rope tables): prefill through the
    decode kernel (each token over its row's window) and a step whose attention reads only the window, with the
    LoRA deltas fused into the next kernels (the windowed kernel itself: tests/test_decode_attention.py)."""
    model = _with_adapters(_gemma3(sliding_window=5), "gemma3_text")
    decoder = StaticDecoder(model, max_batch=4, max_len=16, lora_overlap="lora")
    _grow_and_compare(model, decoder, [3, 0, 2, 1], LONG_PROMPTS, ["a", None, "b", "a"], steps=1)


def test_admitted_rows_from_a_sliding_window_cache(references_only, monkeypatch):
    """transformers' config-built cache keeps only the last window - 1 keys of a sliding layer (and all of a full
    one): admit places them at their positions, and the rows then decode exactly past the window (Gemma 3: both
    kinds). lorakit's own prefill keeps every key (its rows must stay equal in width); this builds the cropped cache
    a transformers caller would hand over."""
    from transformers import DynamicCache

    import lorakit.generation as generation

    model = _with_adapters(_gemma3(sliding_window=5), "gemma3_text")
    prompts = [LONG_PROMPTS[0], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]]  # one length: no padding to zero
    names = ["d", None]
    assert [layer.keys.shape[2] for layer in prefill(model, prompts, names)[1]._kv_layers()] == [11, 11, 11]
    monkeypatch.setattr(generation, "_new_cache", lambda model: DynamicCache(config=model.config))
    logits, batch = prefill(model, prompts, names)
    assert [layer.keys.shape[2] for layer in batch._kv_layers()] == [4, 11, 4]
    decoder = StaticDecoder(model, max_batch=3, max_len=20)
    decoder.admit([2, 0], batch)
    _grow_and_compare(model, decoder, [2, 0], prompts, names, steps=4, first=logits)


def test_window_edge_cases_and_refusals():
    """Which layers slide, as transformers decides; what stays unsupported gets one line."""
    assert [layer.window for layer in StaticDecoder(_qwen2(use_sliding_window=False), 1, 8).parts.layers] == [None] * 3
    assert [layer.window for layer in StaticDecoder(_mistral(sliding_window=None), 1, 8).parts.layers] == [None] * 2
    chunked = _gemma3()
    chunked.config.layer_types = ["chunked_attention", "full_attention", "sliding_attention"]
    unsized = _qwen2()
    unsized.config.sliding_window = None
    for model, message in ((chunked, "not ['chunked_attention']"), (unsized, "no sliding_window size")):
        reason = static_decoding_unsupported(model, 16)
        assert reason is not None and message in reason and "\n" not in reason, reason
        with pytest.raises(LorakitError, match=re.escape(message)):
            StaticDecoder(model, max_batch=1, max_len=16)


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
