"""Generation helpers (batched KV cache over a mixed batch, sampling, prompts) and the generate / inspect commands."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from lorakit import generation as G
from lorakit.cli import main
from test_serve_support import make_tokenizer, tiny_folder_with_adapters


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    """The PyTorch path, as on a CPU deployment (the kernels' own tests cover the Triton path against it)."""
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


def _model_with_adapters(dtype=torch.float32):
    # cast before injecting: the adapters stay float32 (as trained) on a 16-bit base
    model = tiny_llama(vocab_size=200, initializer_range=0.3).to(dtype)
    for seed, name in enumerate(["a", "b"], start=1):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"] if seed == 2
                                                 else "all-linear"), adapter=name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, parameter in lorakit.lora_parameters(model, name):
                if key.endswith("lora_B"):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_rows_equal_rows_alone(dtype):
    """Left padding, a shared KV cache and a mixed batch change nothing: every step's logits equal the row alone."""
    model = _model_with_adapters(dtype)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [20, 21, 22, 23, 24], [40, 41]]
    adapters = ["a", None, "b", "a"]
    params = [G.SamplingParams(max_new_tokens=n) for n in (6, 3, 5, 1)]  # rows leave at different steps
    batched = G.generate(model, prompts, adapters, params, keep_logits=True)
    for prompt, adapter, param, result in zip(prompts, adapters, params, batched):
        alone = G.generate(model, [prompt], [adapter], param, keep_logits=True)[0]
        assert result.tokens == alone.tokens and len(result.tokens) == param.max_new_tokens
        for got, want in zip(result.logits, alone.logits):
            assert_close(got, want, dtype=dtype)


def test_rows_join_and_leave_a_running_batch():
    """The server's schedule: a row joins mid-generation and another leaves; logits stay those of each row alone."""
    model = _model_with_adapters()
    first, second = [5, 6, 7, 8, 9, 10, 11], [3, 4]
    expected_first = G.generate(model, [first], ["a"], G.SamplingParams(max_new_tokens=5), keep_logits=True)[0]
    expected_second = G.generate(model, [second], ["b"], G.SamplingParams(max_new_tokens=4), keep_logits=True)[0]
    logits, batch = G.prefill(model, [first], ["a"])
    tokens = [int(logits[0].argmax())]
    logits = G.decode(model, batch, tokens[-1:], ["a"])
    tokens.append(int(logits[0].argmax()))
    joined_logits, joined = G.prefill(model, [second], ["b"])
    assert_close(joined_logits[0], expected_second.logits[0])
    batch.extend(joined)
    other = [int(joined_logits[0].argmax())]
    logits = G.decode(model, batch, [tokens[-1], other[-1]], ["a", "b"])
    assert_close(logits[0], expected_first.logits[2])
    assert_close(logits[1], expected_second.logits[1])
    batch.keep([1])  # the first row leaves; its padding columns go with it
    assert batch.rows == 1 and batch.length == len(second) + 1 and bool(batch.mask.all())
    logits = G.decode(model, batch, [int(logits[1].argmax())], ["b"])
    assert_close(logits[0], expected_second.logits[2])


def test_sliding_window_rows_of_different_lengths_past_the_window():
    """A sliding-window model (Mistral, window 4) with prompts shorter and longer than the window: batched
    generation, a row joining and one leaving, all equal each row's full forward without a cache (transformers'
    own masking of the window). transformers' config-built cache crops window layers, which used to fail here."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, initializer_range=0.3,
                           max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    model = MistralForCausalLM(config).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4, 9], [20, 21, 22, 23, 24, 25]]
    results = G.generate(model, prompts, [None] * 3, G.SamplingParams(max_new_tokens=4), keep_logits=True)
    for prompt, result in zip(prompts, results):
        sequence = prompt + result.tokens
        with torch.no_grad():
            full = model(torch.tensor([sequence])).logits[0]
        for step, got in enumerate(result.logits):
            assert_close(got, full[len(prompt) - 1 + step])
    logits, batch = G.prefill(model, prompts[:1], [None])
    joined_logits, joined = G.prefill(model, prompts[1:2], [None])
    batch.extend(joined)
    batch.keep([1])  # the long row leaves; the short one goes on past the window
    token = int(joined_logits[0].argmax())
    for step in range(1, 4):
        logits = G.decode(model, batch, [token], [None])
        assert_close(logits[0], results[1].logits[step])
        token = int(logits[0].argmax())


def test_stop_tokens_end_a_row():
    model = _model_with_adapters()
    first = G.generate(model, [[5, 6]], ["a"], G.SamplingParams(max_new_tokens=4))[0].tokens[0]
    result = G.generate(model, [[5, 6]], ["a"], G.SamplingParams(max_new_tokens=4, stop_token_ids=(first,)))[0]
    assert result.tokens == [first] and result.finish_reason == "stop"


def test_a_model_without_logits_to_keep_generates_the_same():
    """transformers 4.x's Bloom, GPT-J, OPT... take no ``logits_to_keep`` (Bloom refuses it): generation and the
    server's prompt scoring leave it out there and slice every position's logits instead."""
    import inspect

    from lorakit.serve.engine import Engine

    model = _model_with_adapters()
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    expected = G.generate(model, prompts, ["a", "b"], G.SamplingParams(max_new_tokens=4), keep_logits=True)
    engine = Engine.__new__(Engine)  # score() alone: no worker thread
    engine.model, engine.device, engine.model_lock = model, torch.device("cpu"), __import__("threading").Lock()
    scored = engine.score(prompts[0], "a", top=3)
    parent = type(model)

    class NoLogitsToKeep(parent):
        def forward(self, *args, **kwargs):
            if "logits_to_keep" in kwargs:
                raise ValueError(f"Got unexpected arguments: {{'logits_to_keep': {kwargs['logits_to_keep']}}}")
            return super().forward(*args, **kwargs)

    signature = inspect.signature(parent.forward)
    NoLogitsToKeep.forward.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "logits_to_keep"])
    model.__class__ = NoLogitsToKeep
    assert G.takes_logits_to_keep(model) is False
    results = G.generate(model, prompts, ["a", "b"], G.SamplingParams(max_new_tokens=4), keep_logits=True)
    for got, want in zip(results, expected):
        assert got.tokens == want.tokens
        assert_close(torch.stack(got.logits), torch.stack(want.logits))
    again = engine.score(prompts[0], "a", top=3)
    assert again[0] is None and len(again) == len(scored) == len(prompts[0])
    for got, want in zip(again[1:], scored[1:]):
        assert abs(got.logprob - want.logprob) < 1e-5 and [t for t, _ in got.top] == [t for t, _ in want.top]


def test_sampling_temperature_top_p_and_seed():
    logits = torch.tensor([4.0, 3.0, 0.0, -1.0, -2.0])
    greedy = G.SamplingParams(temperature=0)
    assert G.sample(logits, greedy, None) == 0
    nucleus = G.SamplingParams(temperature=1.0, top_p=0.5, seed=1)  # p(0) = 0.71 > 0.5: only token 0 remains
    generator = nucleus.generator(torch.device("cpu"))
    assert {G.sample(logits, nucleus, generator) for _ in range(50)} == {0}
    wide = G.SamplingParams(temperature=1.0, top_p=0.95, seed=3)  # tokens 0 and 1 hold 0.97 > 0.95 (0.71 before 1)
    generator = wide.generator(torch.device("cpu"))
    assert {G.sample(logits, wide, generator) for _ in range(200)} == {0, 1}
    hot = G.SamplingParams(temperature=5.0, seed=7)
    draws = [G.sample(logits, hot, g) for g in [hot.generator(torch.device("cpu"))] for _ in range(30)]
    again = [G.sample(logits, hot, g) for g in [hot.generator(torch.device("cpu"))] for _ in range(30)]
    assert draws == again and len(set(draws)) >= 3
    with pytest.raises(lorakit.LorakitError, match="top_p"):
        G.SamplingParams(top_p=0)
    with pytest.raises(lorakit.LorakitError, match="max_new_tokens"):
        G.SamplingParams(max_new_tokens=0)


def test_prompts_and_chat_template():
    tokenizer = make_tokenizer()
    chat = G.encode_prompt(tokenizer, "hi")
    assert tokenizer.decode(chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(G.encode_prompt(tokenizer, "hi", chat=False)) == "hi"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in G.end_of_turn_ids(tokenizer)
    tokenizer.chat_template = None
    assert tokenizer.decode(G.encode_prompt(tokenizer, "hi")) == "hi"
    with pytest.raises(lorakit.LorakitError, match="no chat template"):
        G.encode_prompt(tokenizer, [{"role": "user", "content": "hi"}])


# -- commands -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return tiny_folder_with_adapters(tmp_path_factory.mktemp("generate"))


def test_generate_compares_adapters_side_by_side(hf, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = ["generate", "--model", str(hf["model"]), "--max-new-tokens", "8", "--base", "Hello there"]
    for folder in hf["adapters"]:
        args += ["--adapter", str(folder)]
    assert main(args) == 0
    out = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(hf["model"])
    model = AutoModelForCausalLM.from_pretrained(hf["model"])
    ids = G.encode_prompt(tokenizer, "Hello there")
    stops = G.end_of_turn_ids(tokenizer)
    texts = []
    for label, folder in [("base", None), *zip(["alpha", "beta"], hf["adapters"])]:
        if folder is not None:
            lorakit.load_adapter(model, folder, adapter=label)
        result = G.generate(model, [ids], [None if folder is None else label], G.SamplingParams(max_new_tokens=8,
                                                                                                stop_token_ids=stops))[0]
        text = tokenizer.decode([t for t in result.tokens if t not in stops], skip_special_tokens=True).strip()
        section = out.split(f"=== {label} (")[1].split("\n", 1)[1].split("===")[0].strip()
        assert section == text, label
        texts.append(text)
    assert len(set(texts)) == 3  # the adapters change the answer


def test_generate_refuses_bad_input(hf, capsys):
    assert main(["generate", "--model", str(hf["model"]), "--adapter", str(hf["model"]), "hi"]) == 2
    assert "adapter_model.safetensors not found" in capsys.readouterr().err
    assert main(["generate", "--model", str(hf["model"]), "--top-p", "0", "hi"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


def test_inspect_lorakit_and_peft_adapters(hf, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    assert main(["inspect", str(hf["adapters"][0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank"] == 4 and info["alpha"] == 8 and info["variant"] == "lora" and info["scaling"] == 2
    assert info["adapted_layers"] == 14 and info["adapted_modules"]["q_proj"] == 2
    assert info["trainable_parameters"] > 0 and info["file_bytes"] > 0 and info["base_fingerprint"]
    assert info["made_by"].startswith("lorakit")
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"],
                                                         use_dora=True, rank_pattern={"v_proj": 2}))
    peft_model.save_pretrained(tmp_path / "peft")
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    text = capsys.readouterr().out
    assert "dora" in text and "in file: [2, 6]" in text and "q_proj x2" in text and "peft" in text
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
