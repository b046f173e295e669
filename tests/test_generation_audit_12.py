"""Audit of ``lorakit.generation`` against transformers' own ``model.generate`` (greedy, tiny random models with a
LoRA adapter): hybrid models that mix linear-attention / SSM / convolution layers with sliding-window attention,
attention-free Mamba models, and the rough edges of sampling parameters and prompts."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

import lorakit
from conftest import assert_close
from lorakit import generation as G
from lorakit.errors import LorakitError
from model_helpers import hf_greedy

# prompts longer (11, 7) and shorter (3) than the window of 4, generated together with left padding
PROMPTS = [list(range(5, 16)), [3, 4, 9], list(range(20, 27))]
NEW = 4


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    """The PyTorch path, as on a CPU deployment (the kernels' own tests cover the Triton path against it)."""
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


def _needs(*names):
    return pytest.mark.skipif(not all(hasattr(transformers, n) for n in names),
                              reason=f"{names[0]} is not in transformers {transformers.__version__}")


# family -> (model class, config class, config); each has layers that keep a state, not keys, beside window layers
TINY = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128, pad_token_id=None, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
HYBRIDS = {
    # gated delta net (linear_attention), sliding and full attention, MoE: Qwen3-Next's layers with a window
    "lara_mini": ("LaraMiniForCausalLM", "LaraMiniConfig", dict(
        TINY, num_hidden_layers=5, sliding_window=4, linear_conv_kernel_dim=3, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=2, num_experts_per_tok=1)),
    # LFM2's short convolutions (conv) with sliding and full attention
    "lfm3": ("Lfm3ForCausalLM", "Lfm3Config", dict(
        TINY, num_hidden_layers=5, intermediate_size=48, sliding_window=4, conv_L_cache=3)),
    # a convolution state and attention in the same layer, window layers and full ones ("hybrid_sliding", "hybrid")
    "inkling": ("InklingForCausalLM", "InklingTextConfig", dict(
        TINY, num_hidden_layers=3, unpadded_vocab_size=100, intermediate_size=48, swa_num_attention_heads=4,
        swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4, d_rel=4, rel_extent=8, conv_kernel_size=3,
        moe_intermediate_size=16, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1, num_mtp_layers=0,
        local_layer_ids=[0, 1])),
}


def _with_adapter(model):
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"), adapter="a")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, parameter in lorakit.lora_parameters(model, "a"):
            if key.endswith("lora_B"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _build(model_class, config_class, config):
    config = getattr(transformers, config_class)(**config)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return _with_adapter(getattr(transformers, model_class)(config).eval())


def _greedy(model, prompts, new=NEW, **kwargs):
    return [r.tokens for r in G.generate(model, prompts, ["a"] * len(prompts), G.SamplingParams(max_new_tokens=new),
                                         **kwargs)]


@pytest.mark.parametrize("family", sorted(HYBRIDS))
def test_hybrid_window_models_generate_as_transformers(family):
    """State layers beside sliding-window layers, prompts past the window, three lengths in one batch: lorakit's
    tokens equal transformers' generate, both batched (left padding) and one prompt at a time. The config-built
    cache used to crop the window layers, and prefill failed on rows of different lengths."""
    model_class, config_class, config = HYBRIDS[family]
    if not hasattr(transformers, config_class):
        pytest.skip(f"{config_class} is not in transformers {transformers.__version__}")
    model = _build(model_class, config_class, config)
    layer_types = set(model.config.layer_types)
    assert layer_types & {"sliding_attention", "hybrid_sliding"} or model.config.sliding_window, layer_types
    ours = _greedy(model, PROMPTS)
    assert ours == hf_greedy(model, PROMPTS, NEW)
    assert hf_greedy(model, PROMPTS[1:2], NEW) == ours[1:2]  # the row with the most padding, alone


@_needs("LaraMiniConfig")
def test_rows_join_and_leave_with_recurrent_states():
    """The server's schedule on a hybrid: a row joins a running batch and another leaves. The linear-attention
    layers' conv / recurrent states (one per row, no columns) must follow their rows like the keys do; they stayed
    behind (a joined row had no state, a kept row another row's)."""
    model = _build(*HYBRIDS["lara_mini"])
    first, second = PROMPTS[0], PROMPTS[1]
    alone = [G.generate(model, [p], ["a"], G.SamplingParams(max_new_tokens=4), keep_logits=True)[0]
             for p in (first, second)]
    logits, batch = G.prefill(model, [first], ["a"])
    logits = G.decode(model, batch, [int(logits[0].argmax())], ["a"])
    assert_close(logits[0], alone[0].logits[1])
    joined_logits, joined = G.prefill(model, [second], ["a"])
    batch.extend(joined)
    logits = G.decode(model, batch, [int(logits[0].argmax()), int(joined_logits[0].argmax())], ["a", "a"])
    assert_close(logits[0], alone[0].logits[2])
    assert_close(logits[1], alone[1].logits[1])
    batch.keep([1])  # the long row leaves: the short one keeps its own state
    for step in (2, 3):
        logits = G.decode(model, batch, [int(logits[-1].argmax())], ["a"])
        assert_close(logits[0], alone[1].logits[step])


@pytest.mark.parametrize("family", ["MambaForCausalLM", "Mamba2ForCausalLM"])
def test_attention_free_models_generate_as_transformers(family):
    """Mamba multiplies each fed token's hidden state by its mask column: given the whole (B, L) mask on a decode
    step it broadcast one token into L and answered garbage from the third token on."""
    if family == "MambaForCausalLM":
        config = transformers.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=8,
                                          initializer_range=0.3)
    else:
        config = transformers.Mamba2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=8,
                                           num_heads=4, head_dim=16, n_groups=1, chunk_size=4, initializer_range=0.3)
    torch.manual_seed(0)
    model = _with_adapter(getattr(transformers, family)(config).eval())
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x keeps the state in its own MambaCache: refused
        with pytest.raises(LorakitError, match=f"does not support {family} on transformers 4.*upgrade to transformers 5"):
            _greedy(model, PROMPTS)
        return
    ours = _greedy(model, PROMPTS)
    assert ours == hf_greedy(model, PROMPTS, NEW)
    assert hf_greedy(model, PROMPTS[1:2], NEW) == ours[1:2]


REFUSED = {
    # keeps its state in its layers' attributes and resets it when the batch size changes: rows joining or leaving
    # a batch would lose it
    "RecurrentGemma": ("RecurrentGemmaForCausalLM", "RecurrentGemmaConfig", dict(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        lru_width=32, attention_window_size=4, conv1d_width=3)),
    # its earlier loops read the cache cut to the window, which a cache keeping whole rows does not line up with
    "Dory with recurrent_kv_cache_mode='last_loop'": ("DoryForCausalLM", "DoryConfig", dict(
        TINY, num_hidden_layers=4, intermediate_size=48, sliding_window=4, n_input_layers=1, n_output_layers=1,
        recurrent_kv_cache_mode="last_loop")),
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_families_lorakit_cannot_batch_are_refused_in_one_line(family):
    """Refused with the alternative, not answered wrong (RecurrentGemma generated without a word before)."""
    model_class, config_class, config = REFUSED[family]
    if not hasattr(transformers, config_class):
        pytest.skip(f"{config_class} is not in transformers {transformers.__version__}")
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    with pytest.raises(LorakitError, match=f"does not support {re.escape(family)}.*model.generate") as error:
        G.generate(model, PROMPTS, [None] * 3, G.SamplingParams(max_new_tokens=2))
    assert "\n" not in str(error.value)
    assert G.unsupported(model) == str(error.value)


# -- a demanding user's edge cases ---------------------------------------------------------------------------------
def _llama_and_tokenizer():
    from conftest import tiny_llama
    from test_serve_support import make_tokenizer

    tokenizer = make_tokenizer()
    return tiny_llama(vocab_size=len(tokenizer), initializer_range=0.3, max_position_embeddings=64), tokenizer


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    return (width, torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
            torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]))


def test_end_token_lists_and_stop_strings_stop_as_transformers():
    """A list of end tokens (as generation_config.eos_token_id holds them) stops each row where transformers'
    generate stops it (batched); stop strings stop a row at the token transformers' stop_strings stops at."""
    model, tokenizer = _llama_and_tokenizer()
    prompts = [tokenizer(t)["input_ids"] for t in ("The quick brown fox", "Paris is", "Numbers: 0 1 2 3 4 5 6 7")]
    free = [r.tokens for r in G.generate(model, prompts, [None] * 3, G.SamplingParams(max_new_tokens=10))]
    ends = [free[0][1], free[1][3]]  # row 0 ends at its 2nd token, row 1 at its 4th (or earlier, on the other id)
    ours = G.generate(model, prompts, [None] * 3, G.SamplingParams(max_new_tokens=10, stop_token_ids=ends))
    width, ids, mask = _left_padded(prompts)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=ends,
                               pad_token_id=0)[:, width:].tolist()
    cut = [next((k + 1 for k, t in enumerate(row) if t in ends), len(row)) for row in reference]  # padding after
    assert [r.tokens for r in ours] == [row[:n] for row, n in zip(reference, cut)]
    assert ours[0].finish_reason == "stop" and len(ours[0].tokens) <= 2
    stop = [tokenizer.decode(free[2][2:3]).strip()[:3]]  # a piece of the third row's third token
    ours = G.generate(model, prompts, [None] * 3, G.SamplingParams(max_new_tokens=10, stop=stop), tokenizer=tokenizer)
    for prompt, result in zip(prompts, ours):  # alone: transformers lets finished rows of a batch run on
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, stop_strings=stop,
                                   tokenizer=tokenizer, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert result.tokens == reference
        assert stop[0] not in result.text
    assert ours[2].finish_reason == "stop" and len(ours[2].tokens) <= 3


def test_pad_id_outside_the_vocabulary_is_refused_in_one_line():
    """The padding id is only written where the mask is 0, but it still goes through the embedding: one outside the
    vocabulary (a tokenizer's added [PAD] the model was never resized for, or -100) crashed with IndexError."""
    model, _ = _llama_and_tokenizer()
    for pad in (len(_) + 5, -100):
        with pytest.raises(LorakitError, match=rf"pad_id {pad} is outside this model's vocabulary \[0, \d+\)"):
            G.generate(model, [[5, 6, 7], [3]], [None, None], G.SamplingParams(max_new_tokens=2), pad_id=pad)
    # equal lengths need no padding: any pad_id is fine
    assert len(G.generate(model, [[5, 6]], [None], G.SamplingParams(max_new_tokens=2), pad_id=-100)[0].tokens) == 2


def test_a_tokenizer_without_pad_token_pads_all_the_same():
    """pad_id=tokenizer.pad_token_id is None for Llama / GPT-2 tokenizers: rows of different lengths then failed
    (torch.full with None); any id pads the same (the padding is masked), so None pads with 0."""
    model, _ = _llama_and_tokenizer()
    prompts, params = [[5, 6, 7, 8], [3]], G.SamplingParams(max_new_tokens=3)
    assert ([r.tokens for r in G.generate(model, prompts, [None] * 2, params, pad_id=None)]
            == [r.tokens for r in G.generate(model, prompts, [None] * 2, params, pad_id=7)])


def test_numpy_and_tensor_numbers_are_taken_as_numbers():
    """Values read from numpy or torch (np.int64 lengths, an array of end ids, np.float32 temperatures) were refused
    as 'must be a positive integer, got np.int64(3)'; they are numbers, and generation equals the Python values'."""
    import numpy as np

    model, _ = _llama_and_tokenizer()
    params = G.SamplingParams(max_new_tokens=np.int64(4), temperature=np.float32(0.5), top_p=np.float64(0.9),
                              top_k=np.int32(5), seed=np.uint64(3), stop_token_ids=np.array([7, 9]))
    plain = G.SamplingParams(max_new_tokens=4, temperature=0.5, top_p=0.9, top_k=5, seed=3, stop_token_ids=(7, 9))
    assert (params.max_new_tokens, params.top_k, params.seed, params.stop_token_ids) == (4, 5, 3, (7, 9))
    assert all(type(v) is int for v in (params.max_new_tokens, params.top_k, params.seed, *params.stop_token_ids))
    assert type(params.temperature) is float and abs(params.temperature - 0.5) < 1e-7
    assert G.SamplingParams(stop_token_ids=torch.tensor([7, 9])).stop_token_ids == (7, 9)
    assert G.SamplingParams(stop_token_ids=np.int64(7)).stop_token_ids == (7,)
    prompts = [[5, 6, 7, 8], [3]]
    assert ([r.tokens for r in G.generate(model, prompts, [None] * 2, params)]
            == [r.tokens for r in G.generate(model, prompts, [None] * 2, plain)])
    for bad in (np.float64(2.0), True, torch.tensor([1.5])):  # still not integers
        with pytest.raises(LorakitError, match="max_new_tokens must be a positive integer"):
            G.SamplingParams(max_new_tokens=bad)
    with pytest.raises(LorakitError, match="stop_token_ids must be token ids"):
        G.SamplingParams(stop_token_ids=np.array([1.5]))


def test_an_empty_prompt_in_a_batch_is_named():
    model, _ = _llama_and_tokenizer()
    with pytest.raises(LorakitError, match=r"empty prompt \(prompt 1\)"):
        G.generate(model, [[1, 2], []], [None, None], G.SamplingParams(max_new_tokens=2))


def test_generation_config_end_tokens_end_the_answer(tmp_path, capsys):
    """transformers' generate stops on every id of generation_config.eos_token_id (Llama 3.1's <|eom_id|>, GLM-4's
    <|user|>); end_of_turn_ids(tokenizer, model) has them too, so lorakit generate stops where generate does."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.cli import main
    from test_serve_support import tiny_hf_folder

    folder = tiny_hf_folder(tmp_path / "model", initializer_range=0.5)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = G.encode_prompt(tokenizer, "Hello there")
    free = G.generate(model, [ids], [None], G.SamplingParams(max_new_tokens=8,
                                                             stop_token_ids=G.end_of_turn_ids(tokenizer)))[0].tokens
    # an id the tokenizer does not call an end (only the model's generation config will), after some visible text
    at = next(k for k in range(1, len(free)) if free[k] not in free[:k] and tokenizer.decode(free[:k]).strip())
    end = free[at]
    assert end not in G.end_of_turn_ids(tokenizer)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, end]
    (folder / "generation_config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert end in G.end_of_turn_ids(tokenizer, model)
    reference = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert reference == free[:at + 1]
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "8", "Hello there"]) == 0
    expected = tokenizer.decode([t for t in reference if t != end], skip_special_tokens=True)
    assert capsys.readouterr().out == expected + "\n"


def test_a_stop_string_of_multibyte_characters_is_seen_while_generating():
    """Generation looks for stop strings in the decoded tail of a row's tokens. A byte-level tokenizer spends up to
    4 tokens on one character (3 on each of these CJK ones); the tail was len(stop) + 8 tokens, so a 6-character
    stop string (18 tokens) was never seen and the row ran on to max_new_tokens (its text was cut only at the end)."""
    from test_serve_support import make_tokenizer

    tokenizer = make_tokenizer()
    stop = "漢字かなカナ"
    tokens = tokenizer("Hello " + stop)["input_ids"]
    assert len(tokens) > len(stop) + 8  # byte tokens: more tokens than characters
    assert G._stopped(G.Generation(tokens, "length"), G.SamplingParams(stop=[stop, "x"]), tokenizer)
    assert not G._stopped(G.Generation(tokens[:-1], "length"), G.SamplingParams(stop=stop), tokenizer)


def test_sampling_edges_and_seeds():
    """temperature -> 0, top_k 1 and top_p -> 0 all reduce to greedy; a seed gives a row the same tokens whatever
    else is in its batch, and two seeds differ; the distribution sampled is transformers' (temperature, top-k, top-p
    warpers) within the noise of 2500 draws."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    model, _ = _llama_and_tokenizer()
    prompts = [[5, 6, 7, 8, 9, 10], [3, 4]]

    def run(rows=prompts, **kwargs):
        return [r.tokens for r in G.generate(model, rows, [None] * len(rows), G.SamplingParams(max_new_tokens=6, **kwargs))]

    greedy = run()
    for edge in (dict(temperature=1e-6), dict(temperature=5.0, top_k=1), dict(temperature=5.0, top_p=1e-9)):
        assert run(seed=1, **edge) == greedy, edge
    hot = dict(temperature=1.5, top_k=50, top_p=0.95)
    assert run(seed=4, **hot) == run(seed=4, **hot)
    assert run(seed=4, **hot)[1] == run(prompts[1:], seed=4, **hot)[0]  # alone or in a batch
    assert run(seed=4, **hot) != run(seed=5, **hot)

    logits = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 2
    for temperature, top_k, top_p in ((0.7, 0, 1.0), (2.0, 4, 0.8)):
        warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), *([TopKLogitsWarper(top_k)] if top_k else []),
                                       *([TopPLogitsWarper(top_p)] if top_p < 1 else [])])
        expected = torch.softmax(warpers(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0], dim=-1)
        params = G.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=1)
        generator = params.generator(torch.device("cpu"))
        draws = torch.tensor([G.sample(logits, params, generator) for _ in range(2500)])
        frequencies = torch.bincount(draws, minlength=12).float() / len(draws)
        assert (frequencies - expected).abs().max() < 0.035  # 3.5 standard deviations at most
        assert not frequencies[expected == 0].any()  # nothing outside transformers' top-k / nucleus


def test_a_stop_string_naming_a_special_token_stops_as_transformers():
    """stop="<|im_end|>" (a special token's text): transformers' stop_strings stops on it; lorakit looked only at
    the text with special tokens removed, so the row ran on to max_new_tokens. The text still leaves them out."""
    model, tokenizer = _llama_and_tokenizer()
    special = set(tokenizer.all_special_ids)
    candidates = torch.randint(3, len(tokenizer), (48, 6), generator=torch.Generator().manual_seed(0)).tolist()
    answers = G.generate(model, candidates, [None] * 48, G.SamplingParams(max_new_tokens=12))
    # a prompt whose greedy answer holds a special token before its end
    prompt, free, at = next((p, r.tokens, k) for p, r in zip(candidates, answers)
                            for k, t in enumerate(r.tokens[:-1]) if t in special)
    stop = tokenizer.convert_ids_to_tokens(free[at])
    result = G.generate(model, [prompt], [None], G.SamplingParams(max_new_tokens=12, stop=stop), tokenizer=tokenizer)[0]
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, stop_strings=[stop],
                               tokenizer=tokenizer, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert result.tokens == reference == free[:at + 1] and result.finish_reason == "stop"
    assert result.text == tokenizer.decode(free[:at], skip_special_tokens=True)


@_needs("DeepseekV32Config")
def test_sparse_attention_indexer_keys_follow_rows():
    """DeepSeek-V3.2's sparse attention caches indexer keys (B, L, d) beside the K/V: a row leaving the batch
    (rows of different max_new_tokens) left them at the old batch size, and the next step failed in torch.cat.
    They now move with the rows: lorakit equals transformers' batched generate (whose padded rows can differ from
    the row alone: its indexer at decode steps), and a row alone equals transformers' alone."""
    config = transformers.DeepseekV32Config(
        vocab_size=100, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4,
        v_head_dim=8, qk_nope_head_dim=4, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=1, index_topk=4, index_head_dim=8, index_n_heads=2, head_dim=8,
        max_position_embeddings=128, initializer_range=0.3)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = _with_adapter(transformers.DeepseekV32ForCausalLM(config).eval())
    limits = (NEW, 2, NEW)
    ours = [r.tokens for r in G.generate(model, PROMPTS, ["a"] * 3, [G.SamplingParams(max_new_tokens=n) for n in limits])]
    assert ours == [row[:n] for row, n in zip(hf_greedy(model, PROMPTS, NEW), limits)]
    assert _greedy(model, PROMPTS[2:]) == hf_greedy(model, PROMPTS[2:], NEW)
