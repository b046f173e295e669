"""lorakit.decoding.StaticDecoder against transformers' own decode (lorakit.generation), row by row.

The reference is ``generation.prefill`` + ``generation.decode`` (transformers' forward, lorakit's mixed batches,
DoRA by lorakit.variants.dora); the decoder must give the same next-token logits for every row at every step, with
rows on different adapters (ranks differ, some projections without the adapter, DoRA, no adapter), joining and
leaving at different steps. Kernels run under TRITON_INTERPRET=1 (conftest), float32.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.decoding import StaticDecoder, static_decoding_unsupported
from lorakit.errors import LorakitError
from lorakit.generation import decode, prefill
from tests.conftest import tiny_llama

ATOL = 1e-5  # float32 (the table's value); measured 1.2e-7: the decoder sums in another order (fused GEMMs, flash softmax)


def _randomize_b(model, std=0.1):
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if name.endswith(("lora_B", "magnitude")):
                p.add_(torch.randn_like(p) * std)


def _with_adapters(model):
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj", "down_proj"],
                                             variant="rslora"), adapter="b")
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=6, variant="dora"), adapter="d")
    _randomize_b(model)
    return model


PROMPTS = [[5, 9, 2, 7, 1], [3, 4], [8, 8, 1, 2, 3, 4, 5], [11, 12, 13]]
NAMES = ["a", None, "d", "b"]


def _reference(model, prompts, names, steps):
    """Greedy logits per step from transformers' forward (mixed batch)."""
    logits, batch = prefill(model, prompts, names)
    out = [logits]
    for _ in range(steps):
        tokens = out[-1].argmax(dim=-1).tolist()
        out.append(decode(model, batch, tokens, names))
    return out


def _static(model, prompts, names, steps, rows=None, max_batch=6, overlap=None, max_len=16):
    decoder = StaticDecoder(model, max_batch=max_batch, max_len=max_len, lora_overlap=overlap)
    rows = rows or list(range(len(prompts)))
    logits, batch = prefill(model, prompts, names)
    decoder.admit(rows, batch)
    out = [logits]
    for _ in range(steps):
        tokens = out[-1].argmax(dim=-1).tolist()
        out.append(decoder.step(rows, tokens, names))
    return out, decoder


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("overlap,names", [("off", NAMES), ("lora", NAMES), ("lora", ["a", None, "b", "a"])],
                         ids=["one-pass", "delta-scratch-with-dora", "delta-fused-into-next-kernels"])
def test_static_decoder_matches_transformers_with_mixed_adapters(family, overlap, names, monkeypatch):
    """overlap "lora" computes each LoRA pair into a scratch (on CUDA: on a second stream beside the GEMM); without
    DoRA (and for Llama without biases) the scratch is added inside rope + KV store, add + RMSNorm and SwiGLU."""
    import lorakit.kernels.decode_attention as da
    import lorakit.kernels.rmsnorm as rn

    fused_adds, fused_qkv = [], []
    real, real_rope = rn.add_rms_norm_, da.rope_store_
    monkeypatch.setattr(rn, "add_rms_norm_", lambda *a: fused_adds.append(1) or real(*a))
    monkeypatch.setattr(da, "rope_store_", lambda *a, **kw: fused_qkv.append(kw.get("lora") is not None) or real_rope(*a, **kw))
    model = _family(family)
    _with_adapters(model)
    expected = _reference(model, PROMPTS, names, steps=3)
    got, decoder = _static(model, PROMPTS, names, steps=3, rows=[4, 0, 2, 5], overlap=overlap)
    assert decoder.lora_overlap == overlap and decoder.adapters.has_dora == ("d" in names)
    # per step and layer: after o and after down (the last one into the final norm); none when DoRA or one pass
    assert len(fused_adds) == (0 if overlap == "off" or "d" in names else 3 * 2 * 2)
    # rope + KV store expands the q/k/v LoRA itself, except under biases (Qwen2) and q/k norms (Qwen3)
    assert sum(fused_qkv) == (3 * 2 if overlap == "lora" and "d" not in names and family == "llama" else 0)
    for step, (e, g) in enumerate(zip(expected, got)):
        assert torch.allclose(g, e, atol=ATOL, rtol=1e-5), f"step {step}: max diff {(g - e).abs().max():.2e}"
    # the adapters matter: the base model's logits differ by far more than the tolerance
    with lorakit.disable_adapters(model):
        base = _reference(model, PROMPTS, [None] * 4, steps=0)[0]
    assert (base[0] - expected[0][0]).abs().max() > 100 * ATOL


def _family(family):
    if family == "llama":
        return tiny_llama(seed=1)
    torch.manual_seed(2)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
        with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1, 0.3)
            layer.self_attn.k_norm.weight.normal_(1, 0.3)
    return model


def _sliding(family, window):
    torch.manual_seed(5)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, sliding_window=window)
    if family == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(**common)).eval()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=1, **common)).eval()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_models_decode_at_and_past_the_window(family):
    """Up to the window (prompt of 7 + 3 steps = 10 = the window) and past it: with a window one shorter, the last
    step drops key 0 in transformers, and the decoder's windowed attention does the same."""
    window = 10
    model = _with_adapters(_sliding(family, window))
    expected = _reference(model, PROMPTS, NAMES, steps=3)
    got, _ = _static(model, PROMPTS, NAMES, steps=3, max_len=window)
    for step, (e, g) in enumerate(zip(expected, got)):
        assert torch.allclose(g, e, atol=ATOL, rtol=1e-5), f"step {step}: max diff {(g - e).abs().max():.2e}"
    # the boundary is where it is said to be: a window one shorter drops key 0 from the last step in transformers
    model.config.sliding_window = window - 1
    shorter = _reference(model, PROMPTS, NAMES, steps=3)
    past, _ = _static(model, PROMPTS, NAMES, steps=3, max_len=window + 1)
    model.config.sliding_window = window
    for step, (e, g) in enumerate(zip(shorter, past)):
        assert torch.allclose(g, e, atol=ATOL, rtol=1e-5), f"step {step}: max diff {(g - e).abs().max():.2e}"
    assert (shorter[-1][2] - expected[-1][2]).abs().max() > 100 * ATOL
    assert torch.equal(shorter[-2][2], expected[-2][2])  # one step earlier the window was not reached yet
    assert static_decoding_unsupported(model, window) is None and static_decoding_unsupported(model, 4 * window) is None


def test_rows_join_and_leave_without_disturbing_others():
    model = _with_adapters(tiny_llama(seed=3))
    decoder = StaticDecoder(model, max_batch=3, max_len=12)
    decoder.warm_up()  # what the server does at start: a throwaway prompt and step on row 0, released after
    assert decoder.free_rows() == [0, 1, 2] and decoder.lengths == [0, 0, 0]
    first, batch = prefill(model, PROMPTS[:2], NAMES[:2])
    decoder.admit([1, 2], batch)
    step1 = decoder.step([1, 2], first.argmax(-1).tolist(), NAMES[:2])
    decoder.release([2])
    late, batch2 = prefill(model, [PROMPTS[2]], [NAMES[2]])
    decoder.admit([2], batch2)
    both = decoder.step([1, 2], [int(step1[0].argmax()), int(late[0].argmax())], [NAMES[0], NAMES[2]])
    # the same sequences served alone
    alone0 = _reference(model, [PROMPTS[0]], [NAMES[0]], steps=2)
    alone2 = _reference(model, [PROMPTS[2]], [NAMES[2]], steps=1)
    assert torch.allclose(both[0], alone0[2][0], atol=ATOL, rtol=1e-5)
    assert torch.allclose(both[1], alone2[1][0], atol=ATOL, rtol=1e-5)
    assert decoder.free_rows() == [0]
    decoder.admit([0], prefill(model, [PROMPTS[0]], [NAMES[0]])[1])
    with pytest.raises(LorakitError, match="warm_up needs a free cache row"):
        decoder.warm_up()


def test_model_unchanged_by_fusion_and_refresh_after_new_weights():
    model = _with_adapters(tiny_llama(seed=4))
    ids = torch.tensor([PROMPTS[0]])
    before = model(input_ids=ids).logits
    keys = list(model.state_dict())
    decoder = StaticDecoder(model, max_batch=2, max_len=8)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert list(model.state_dict()) == keys
    q = model.model.layers[0].self_attn.q_proj.base_layer
    assert q.weight.data_ptr() == decoder.weights[0]["qkv"].weight.data_ptr()  # a view: no copy kept
    with torch.no_grad():  # a new weight tensor breaks the link; refresh fuses again
        q.weight = torch.nn.Parameter(q.weight * 2, requires_grad=False)
    assert not decoder.weights[0]["qkv"].is_current()
    decoder.refresh()
    assert decoder.weights[0]["qkv"].is_current()
    assert torch.equal(decoder.weights[0]["qkv"].weight[: q.weight.shape[0]], q.weight)


def test_adapter_reload_and_eviction():
    model = _with_adapters(tiny_llama(seed=5))
    out, decoder = _static(model, [PROMPTS[0]], ["a"], steps=1, max_batch=2)
    with torch.no_grad():  # changed in place: the decoder keeps its copy until told
        model.model.layers[0].self_attn.q_proj.adapters["a"].lora_B.mul_(3)
    decoder.reload_adapter("a")
    expected = _reference(model, [PROMPTS[0]], ["a"], steps=1)
    decoder.release([0])
    _, batch = prefill(model, [PROMPTS[0]], ["a"])
    decoder.admit([0], batch)
    got = decoder.step([0], [int(expected[0][0].argmax())], ["a"])
    assert torch.allclose(got[0], expected[1][0], atol=ATOL, rtol=1e-5)
    lorakit.delete_adapter(model, "b")
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=8), adapter="e")  # a larger rank: the stacks grow
    _randomize_b(model)
    expected = _reference(model, [PROMPTS[1]], ["e"], steps=1)
    _, batch = prefill(model, [PROMPTS[1]], ["e"])
    decoder.admit([1], batch)
    got = decoder.step([1], [int(expected[0][0].argmax())], ["e"])
    assert decoder.adapters.r_max >= 8
    assert torch.allclose(got[0], expected[1][0], atol=ATOL, rtol=1e-5)


def test_unsupported_models_and_bad_calls_get_one_line_reasons():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    assert "not 'gpt2'" in static_decoding_unsupported(gpt2)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    assert static_decoding_unsupported(mistral) is None  # sliding windows run at any length
    model = tiny_llama(seed=6)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]), adapter="x")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="ok")
    assert static_decoding_unsupported(model) is None  # rows on "x" are refused, the others decode
    foreign = StaticDecoder(model, max_batch=2, max_len=8)
    assert "embed_tokens" in foreign.unservable("x") and foreign.unservable("ok") is None
    foreign.admit([0], prefill(model, [[1, 2]], ["ok"])[1])
    foreign.step([0], [3], ["ok"])
    foreign.admit([1], prefill(model, [[1, 2]], ["x"])[1])
    with pytest.raises(LorakitError, match="embed_tokens"):
        foreign.step([1], [3], ["x"])
    # an adapter that joins the existing embedding wrapper later (lorakit adds no module, so the model's structure
    # is unchanged) is refused too: it was decoded with the base embedding, a silently wrong answer
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["embed_tokens"]), adapter="late")
    assert "embed_tokens" in foreign.unservable("late") and foreign.unservable("ok") is None
    merged = tiny_llama(seed=7)
    lorakit.inject(merged, lorakit.LoraConfig(r=2), adapter="m")
    lorakit.merge(merged)
    assert "merged" in static_decoding_unsupported(merged)
    plain = tiny_llama(seed=8)
    assert static_decoding_unsupported(plain) is None
    decoder = StaticDecoder(plain, max_batch=2, max_len=4)
    with pytest.raises(LorakitError, match="holds no sequence"):
        decoder.step([0], [1], [None])
    _, batch = prefill(plain, [[1, 2, 3, 4]], [None])
    with pytest.raises(LorakitError, match="does not fit"):
        decoder.admit([0], batch)
    _, batch = prefill(plain, [[1, 2, 3]], [None])
    decoder.admit([0], batch)
    decoder.step([0], [5], [None])
    with pytest.raises(LorakitError, match="full"):
        decoder.step([0], [5], [None])
    with pytest.raises(LorakitError, match="not on any"):
        decoder.admit([1], prefill(plain, [[1]], [None])[1])
        decoder.step([1], [1], ["nope"])
    with pytest.raises(LorakitError, match="'lora', 'serial' or 'off', got 'side'"):
        StaticDecoder(plain, max_batch=2, max_len=4, lora_overlap="side")
    serial = StaticDecoder(plain, max_batch=2, max_len=4, lora_overlap="serial", pdl=False)
    assert serial.lora_overlap == "serial" and serial._lora_stream is None and serial.pdl is False


def test_adapters_injected_after_the_decoder_was_built():
    model = tiny_llama(seed=9)
    decoder = StaticDecoder(model, max_batch=2, max_len=12)
    _with_adapters(model)  # wraps the projections the decoder read at construction
    expected = _reference(model, PROMPTS[:2], ["a", "d"], steps=1)
    _, batch = prefill(model, PROMPTS[:2], ["a", "d"])
    decoder.admit([0, 1], batch)
    got = decoder.step([0, 1], expected[0].argmax(-1).tolist(), ["a", "d"])
    assert torch.allclose(got, expected[1], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("overlap,attention", [("off", "kernels"), ("lora", "kernels"), ("lora", "sdpa-per-prompt")])
def test_prefill_matches_transformers_and_then_decodes(family, overlap, attention, monkeypatch):
    """decoder.prefill (the decoder's own layers over all prompts' tokens, a slot per token) gives transformers'
    prefill logits for every prompt and fills the rows' caches so that the steps after it match as well; mixed
    adapters (LoRA, rsLoRA on a few projections, DoRA, none), prompts of different lengths, rows out of order;
    attention through the decode kernels (rows=) or, as for long prompts, causal SDPA per prompt."""
    import lorakit.decoding.decoder as decoder_module

    if attention == "sdpa-per-prompt":
        monkeypatch.setattr(decoder_module, "PREFILL_KERNEL_MAX_PROMPT", 0)
    model = _family(family)
    _with_adapters(model)
    # two steps read the caches the prefill filled, then one the first step appended to (longer decodes: the test
    # above; each step costs ~4 s under Triton's interpreter)
    expected = _reference(model, PROMPTS, NAMES, steps=2)
    decoder = StaticDecoder(model, max_batch=6, max_len=16, lora_overlap=overlap)
    rows = [4, 0, 2, 5]
    got = [decoder.prefill(rows, PROMPTS, NAMES)]
    assert [decoder.lengths[r] for r in rows] == [len(p) for p in PROMPTS]
    for _ in range(len(expected) - 1):
        got.append(decoder.step(rows, got[-1].argmax(dim=-1).tolist(), NAMES))
    for step, (e, g) in enumerate(zip(expected, got)):
        assert torch.allclose(g, e, atol=ATOL, rtol=1e-5), f"step {step}: max diff {(g - e).abs().max():.2e}"


def test_prefill_refuses_bad_calls_with_one_line_reasons():
    model = tiny_llama(seed=3)
    decoder = StaticDecoder(model, max_batch=2, max_len=6)
    vocab = model.config.vocab_size
    cases = [
        (([0], [[1, 2]], [None, None]), "one prompt and one adapter name per row"),
        (([0, 0], [[1], [2]], [None, None]), "distinct cache rows"),
        (([2], [[1]], [None]), "distinct cache rows in 0..1"),
        (([0], [[]], [None]), "does not fit"),
        (([0], [list(range(6))], [None]), "does not fit"),
        (([0], [[1, vocab]], [None]), f"token ids must be in 0..{vocab - 1}"),
        (([0], [[1, 2]], ["missing"]), "missing"),
    ]
    for args, message in cases:
        with pytest.raises(LorakitError, match=message) as error:
            decoder.prefill(*args)
        assert "\n" not in str(error.value)
    assert decoder.free_rows() == [0, 1]  # nothing was admitted by a refused call
    decoder.prefill([1], [[3, 4, 5]], [None])
    with pytest.raises(LorakitError, match="in use"):
        decoder.prefill([1], [[3]], [None])


def test_serve_uses_the_decoder_for_a_sliding_window_model_past_the_window(capsys):
    from lorakit.serve.cli import static_decoder

    model = _sliding("mistral", 10)
    assert static_decoder(model, "static", max_batch=2, context=10, explicit_context=True).max_len == 10
    assert static_decoder(model, "static", max_batch=2, context=11, explicit_context=True).max_len == 11
    assert static_decoder(model, "auto", max_batch=2, context=10, explicit_context=True) is None  # not on CUDA
