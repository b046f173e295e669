"""A new user's first hour with the Python API (README's "Use it from Python"), on inputs the other tests do not use.

Pinned here: ``load_base`` names a GGUF file / a weights file / a device this machine lacks / a dtype it cannot use
in one line, before reading any weight, and reads dtype names the way people type them; a chat template that ends
turns with an unusual token stops generation (the token is found by rendering the template, shared with
training); sampling edge values (tiny temperature, top_k, string numbers) and misshaped ``generate`` inputs; adapter
misuse (wrong names and types, nested and cross-thread ``mixed_batch``, merging inside one); merge twice / unmerge
twice; ``merge_and_unload`` then ``save_adapter``; a unicode adapter path; ``LoraConfig`` with peft's field names.
"""

from __future__ import annotations

import ast
import inspect
import re
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from conftest import assert_close, tiny_llama
from lorakit import generation as G
from lorakit.errors import LorakitError
from lorakit.inject import lora_layers
from test_serve_support import TEXT, tiny_hf_folder


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")  # the PyTorch path; the kernels' own tests cover Triton


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_hf_folder(tmp_path_factory.mktemp("newuser") / "model")


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def _two_adapters(seed: int = 0) -> nn.Module:
    model = tiny_llama(seed=seed, initializer_range=0.3)
    for index, name in enumerate(["a", "b"]):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter=name)
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for key, parameter in lorakit.lora_parameters(model, name):
                if key.endswith("lora_B"):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


# -- load_base --------------------------------------------------------------------------------------------------------
def test_load_base_names_a_gguf_or_weights_file_and_how_to_fix_it(tmp_path, folder):
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(16))
    with pytest.raises(LorakitError) as error:
        lorakit.load_base(str(gguf))
    assert "is a GGUF file" in _one_line(error) and "gguf_file='model.Q4_K_M.gguf'" in str(error.value)
    with pytest.raises(LorakitError, match="is a file, not a model folder; did you mean its folder"):
        lorakit.load_base(folder / "model.safetensors")


def test_load_base_checks_device_and_dtype_before_loading(tmp_path, monkeypatch):
    missing = str(tmp_path / "not-there")  # arguments are checked first: no folder needed to hear about them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (("foo", "device 'foo' is not a device; use cpu, cuda, cuda:N or mps"),
                            ("cuda", "device cuda: no CUDA GPU is visible"), ("cuda:3", "no CUDA GPU is visible"),
                            (0, "device must be a name like 'cpu'")):
        with pytest.raises(LorakitError) as error:
            lorakit.load_base(missing, device=device)
        assert message in _one_line(error), device
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(LorakitError, match="MPS backend is not available"):
            lorakit.load_base(missing, device="mps")
    for dtype, message in (("fp8", "unknown dtype 'fp8'; choose one of"), (["bf16"], "unknown dtype"),
                           ("auto", "float32 on CPU, bfloat16 on CUDA"), (torch.int8, "not a floating-point dtype")):
        with pytest.raises(LorakitError) as error:
            lorakit.load_base(missing, dtype=dtype)
        assert message in _one_line(error), dtype
    with pytest.raises(LorakitError, match="not both"):
        lorakit.load_base(missing, dtype="bf16", torch_dtype="bf16")
    with pytest.raises(LorakitError, match="got a LlamaForCausalLM; a model already in memory needs no loading"):
        lorakit.load_base(tiny_llama())
    with pytest.raises(LorakitError, match="unknown quantization 'int4'; lorakit supports: nf4"):
        lorakit.load_base(missing, quantize="int4")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # a cached copy would load (no network)
    with pytest.raises(LorakitError) as error:
        lorakit.load_base("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "looks like a Hugging Face Hub id, and it is not in the Hugging Face cache " in _one_line(error)
    assert "`hf download HuggingFaceTB/SmolLM2-135M-Instruct` puts it there" in _one_line(error)


def test_load_base_reads_dtype_names_as_people_type_them(folder):
    for dtype, expected in (("BF16", torch.bfloat16), ("torch.float16", torch.float16), ("half", torch.float16),
                            (torch.float64, torch.float64)):
        model, _ = lorakit.load_base(folder, dtype=dtype, device="CPU")
        assert next(model.parameters()).dtype == expected, dtype
    model, _ = lorakit.load_base(folder, torch_dtype="bf16")  # transformers' older name, from copied code
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_attention_package_is_one_line(folder):
    with pytest.raises(LorakitError) as error:
        lorakit.load_base(folder, device="cpu", attn_implementation="flash_attention_2")
    assert _one_line(error).startswith("cannot load the model in")


def test_tokenizer_without_pad_token_or_template_generates_a_ragged_batch(tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_hf_folder(tmp_path / "plain")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink()  # a base model's tokenizer: no template, no pad token
    model, tokenizer = lorakit.load_base(folder, device="cpu")
    assert tokenizer.pad_token == tokenizer.eos_token
    prompts = [G.encode_prompt(tokenizer, text) for text in ("Hello", TEXT[1])]
    assert prompts[0] == tokenizer("Hello")["input_ids"] and len(prompts[1]) > 3 * len(prompts[0])  # no template
    rows = G.generate(model, prompts, [None, None], G.SamplingParams(max_new_tokens=4), pad_id=tokenizer.pad_token_id)
    for prompt, row in zip(prompts, rows):
        assert row.tokens == G.generate(model, [prompt], [None], G.SamplingParams(max_new_tokens=4))[0].tokens


def test_a_tokenizer_saved_by_transformers_5_loads_on_any_transformers(tmp_path):
    """transformers 5.x saves ``"tokenizer_class": "TokenizersBackend"``, a class 4.x's AutoTokenizer does not know;
    the same tokenizer.json loads as the fast tokenizer there, with its special tokens and chat template."""
    import json

    from transformers import AutoTokenizer

    folder = tiny_hf_folder(tmp_path / "saved_by_5x")
    original = AutoTokenizer.from_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config_path.write_text(json.dumps(config))
    tokenizer = lorakit.models.loading.load_tokenizer(folder)
    chat = [{"role": "user", "content": TEXT[1]}]
    assert tokenizer(TEXT[0])["input_ids"] == original(TEXT[0])["input_ids"]
    assert set(tokenizer(TEXT[0])) == {"input_ids", "attention_mask"}  # as 5.x: what generate(**inputs) takes
    assert tokenizer.eos_token == original.eos_token and tokenizer.pad_token is not None
    assert tokenizer.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)


# -- end of turn from the chat template -------------------------------------------------------------------------------
UNUSUAL = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}{% if m['role'] == 'assistant' %}<|over|>"
           "{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant]: {% endif %}")


def _unusual_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>", "<|over|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", chat_template=UNUSUAL)


def test_a_template_that_ends_turns_with_an_unusual_token_stops_generation():
    from lorakit.chat_template import template_end_of_turn
    from lorakit.train import data

    tokenizer = _unusual_tokenizer()
    over = tokenizer.convert_tokens_to_ids("<|over|>")
    assert over not in [tokenizer.convert_tokens_to_ids(t) for t in G.END_OF_TURN_TOKENS if t in tokenizer.get_vocab()]
    assert template_end_of_turn(tokenizer) == over
    stops = G.end_of_turn_ids(tokenizer)
    assert over in stops and tokenizer.eos_token_id in stops
    assert data.tokenizer_info(tokenizer).chat_eot_id == over  # training reads the same helper
    assert data.template_end_of_turn is template_end_of_turn

    model = tiny_llama(vocab_size=len(tokenizer))
    head = nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)  # a model that wants to end its turn
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[over] = 10.0
    model.lm_head = head
    prompt = G.encode_prompt(tokenizer, "Hello")
    assert tokenizer.decode(prompt) == "[user]: Hello[assistant]: "
    row = G.generate(model, [prompt], [None], G.SamplingParams(max_new_tokens=8, stop_token_ids=stops))[0]
    assert row.tokens == [over] and row.finish_reason == "stop"


def test_a_template_that_demands_a_system_turn_still_gives_its_end_of_turn():
    from lorakit.chat_template import template_end_of_turn

    tokenizer = _unusual_tokenizer()
    tokenizer.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
                               + UNUSUAL)
    assert template_end_of_turn(tokenizer) == tokenizer.convert_tokens_to_ids("<|over|>")
    tokenizer.chat_template = "{{ raise_exception('no chats') }}"
    assert template_end_of_turn(tokenizer) is None
    assert G.end_of_turn_ids(tokenizer) == (tokenizer.eos_token_id,)


def test_core_side_helpers_never_import_training_code():
    import lorakit.chat_template
    import lorakit.generation

    for module in (lorakit.chat_template, lorakit.generation):
        tree = ast.parse(inspect.getsource(module))
        imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [name for name in imported if name.startswith("lorakit.train")], module.__name__


# -- sampling and generate --------------------------------------------------------------------------------------------
def test_sampling_edge_values():
    logits = torch.tensor([1.0, 3.0, 2.0, -5.0])
    tiny = G.SamplingParams(temperature=1e-40, seed=0)  # logits / 1e-40 overflow to inf: softmax would give NaN
    assert all(G.sample(logits, tiny, tiny.generator(logits.device)) == 1 for _ in range(5))
    nucleus = G.SamplingParams(temperature=1.0, top_p=1e-9, seed=0)
    assert all(G.sample(logits, nucleus, nucleus.generator(logits.device)) == 1 for _ in range(5))
    top2 = G.SamplingParams(temperature=100.0, top_k=2, seed=0)  # nearly uniform, but only among the best two
    generator = top2.generator(logits.device)
    drawn = {G.sample(logits, top2, generator) for _ in range(60)}
    assert drawn == {1, 2}
    wide = G.SamplingParams(temperature=100.0, top_k=1000, seed=0)  # k above the vocabulary: all tokens
    generator = wide.generator(logits.device)
    assert {G.sample(logits, wide, generator) for _ in range(200)} == {0, 1, 2, 3}
    assert G.SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert G.SamplingParams(temperature=1).temperature == 1.0
    for kwargs, message in ((dict(temperature="0.7"), "temperature must be a number in [0, 100], got '0.7'"),
                            (dict(top_p=float("nan")), "top_p must be a number in (0, 1]"),
                            (dict(top_k=-1), "top_k must be a non-negative integer"),
                            (dict(stop_token_ids="<|im_end|>"), "stop_token_ids must be token ids"),
                            (dict(seed="42"), "seed must be an integer"), (dict(max_new_tokens=0), "positive integer")):
        with pytest.raises(LorakitError) as error:
            G.SamplingParams(**kwargs)
        assert message in _one_line(error), kwargs


def test_generate_refuses_misshaped_inputs_with_the_fix():
    model = _two_adapters()
    params = G.SamplingParams(max_new_tokens=2)
    cases = [((["hello"], ["a"], params), "prompt 0 is text; give token ids: lorakit.generation.encode_prompt"),
             (([5, 6, 7], ["a"] * 3, params), "wrap a single prompt in a list"),
             (([[5, 6], [7]], "ab", params), "adapters must be a list with one adapter name"),
             (([[5, 6], [7]], ["a", "b"], [params]), "params must be one SamplingParams or a list of 2"),
             (([[5, 128]], ["a"], params), "token id 128, outside this model's vocabulary [0, 128)"),
             (([[5, -1]], [None], params), "token id -1"),
             (([[5, 1.5]], [None], params), "prompt 0 is not a list of token ids"),
             (([], [], params), "no prompts to generate from"),
             (([[5], []], ["a", "b"], params), "empty prompt"),
             (([[5]], ["c"], params), "unknown adapter 'c'; this model has: a, b")]
    for args, message in cases:
        with pytest.raises(LorakitError) as error:
            G.generate(model, *args)
        assert message in _one_line(error), args


def test_stop_strings_end_a_row_and_cut_its_text():
    from test_serve_support import make_tokenizer

    tokenizer = make_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), initializer_range=0.5)
    prompts = [G.encode_prompt(tokenizer, "Hello"), G.encode_prompt(tokenizer, TEXT[2], chat=False)]
    free = G.generate(model, prompts, [None, None], G.SamplingParams(max_new_tokens=12), tokenizer=tokenizer)
    assert [row.text for row in free] == [tokenizer.decode(row.tokens, skip_special_tokens=True) for row in free]
    text = free[0].text
    assert len(text) >= 6
    stop = text[3:5]
    params = [G.SamplingParams(max_new_tokens=12, stop=[stop, "\x00never"]), G.SamplingParams(max_new_tokens=12)]
    rows = G.generate(model, prompts, [None, None], params, tokenizer=tokenizer)
    assert rows[0].finish_reason == "stop" and rows[0].text == text[:text.find(stop)]
    assert rows[0].tokens == free[0].tokens[:len(rows[0].tokens)] and len(rows[0].tokens) < 12
    assert rows[1].tokens == free[1].tokens and rows[1].finish_reason == "length"  # its neighbour is untouched
    with pytest.raises(LorakitError, match=r"stop strings need the tokenizer .*generate\(\.\.\., tokenizer=tokenizer\)"):
        G.generate(model, prompts[:1], [None], G.SamplingParams(stop="x"))
    with pytest.raises(LorakitError, match="stop must be a non-empty string or a list of them, got"):
        G.SamplingParams(stop=[""])
    with pytest.raises(LorakitError, match="give plain text instead"):
        G.encode_prompt(_unusual_tokenizer_without_template(), [{"role": "user", "content": "hi"}])
    with pytest.raises(LorakitError, match="a prompt is a string or a list of chat messages"):
        G.encode_prompt(tokenizer, 5)


def _unusual_tokenizer_without_template():
    tokenizer = _unusual_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def test_generate_names_context_overflow_training_mode_and_a_merged_model():
    model = _two_adapters()  # context: 128 positions
    with pytest.raises(LorakitError, match="prompt 1 is 120 tokens and max_new_tokens is 9: more than the model's "
                                           "context of 128 positions"):
        G.generate(model, [[1] * 5, [1] * 120], ["a", "b"], G.SamplingParams(max_new_tokens=9))
    assert len(G.generate(model, [[1] * 120], ["a"], G.SamplingParams(max_new_tokens=8))[0].tokens) == 8
    model.train()
    with pytest.warns(UserWarning, match=r"training mode: dropout makes the answers random; call model.eval\(\)"):
        G.generate(model, [[1, 2]], ["a"], G.SamplingParams(max_new_tokens=1))
    model.eval()
    lorakit.merge(model, "a")
    for adapters in (["a"], [None], ["a", "b"]):
        with pytest.raises(LorakitError, match="needs unmerged adapters; call lorakit.unmerge"):
            G.generate(model, [[1, 2]] * len(adapters), adapters, G.SamplingParams(max_new_tokens=1))


# -- adapters, mixed batches, merging ---------------------------------------------------------------------------------
def test_adapter_misuse_is_one_line():
    model = _two_adapters()
    cases = [(lambda: lorakit.set_adapter(model, None), "set_adapter takes an adapter name or a list of names, got None"),
             (lambda: lorakit.set_adapter(model, 3), "set_adapter takes an adapter name"),
             (lambda: lorakit.delete_adapter(model, ["a"]), "delete_adapter takes one adapter name"),
             (lambda: lorakit.mixed_batch(model, "ab").__enter__(), "for one adapter on every row use lorakit.set_adapter"),
             (lambda: lorakit.mixed_batch(model, [1, None]).__enter__(), "1 is not an adapter name"),
             (lambda: lorakit.merge(model, adapters=3), "adapters takes an adapter name or a list of names")]
    for call, message in cases:
        with pytest.raises(LorakitError) as error:
            call()
        assert message in _one_line(error)
    assert lorakit.active_adapters(model) == ["b"]  # the last injected, untouched by the refusals
    with lorakit.mixed_batch(model, ["a", None]):
        with pytest.raises(LorakitError, match="mixed_batch was given 2 adapter names but the batch has 3 rows"):
            model(torch.randint(0, 128, (3, 4)))
        with pytest.raises(LorakitError, match="cannot merge inside a lorakit.mixed_batch block"):
            lorakit.merge(model)
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_disable_adapters_called_without_with_warns_at_the_users_line():
    import warnings

    model = _two_adapters()
    with pytest.warns(UserWarning, match=r"disable_adapters\(\.\.\.\) does nothing unless used as a block") as record:
        lorakit.disable_adapters(model)  # a plain call: the adapters stay on
    assert record[0].filename == __file__ and record[0].lineno == inspect.currentframe().f_lineno - 1
    with pytest.warns(UserWarning, match="mixed_batch"):
        lorakit.mixed_batch(model, ["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # used as blocks: not a word
        with lorakit.disable_adapters(model), lorakit.mixed_batch(model, ["a"]):
            model(torch.randint(0, 128, (1, 3)))


def test_nested_mixed_batch_restores_the_outer_routing_and_disable_wins():
    model = _two_adapters()
    ids = torch.randint(0, 128, (3, 6))
    with lorakit.disable_adapters(model):
        base = model(ids).logits
    with lorakit.mixed_batch(model, ["a", "b", None]):
        outer = model(ids).logits
        with lorakit.mixed_batch(model, ["b", None, "a"]):
            inner = model(ids).logits
        again = model(ids).logits  # the outer block's routing is back
        with lorakit.disable_adapters(model):
            disabled = model(ids).logits
    assert not torch.allclose(inner, outer)
    assert_close(again, outer)
    assert_close(disabled, base)
    assert_close(outer[2], base[2])
    model(ids)  # outside every block: the active adapter again, no row routing left behind


def test_transformers_generate_with_beams_inside_mixed_batch_keeps_each_rows_adapter(folder):
    """``model.generate`` (README's way) with num_beams=2 repeats each row twice in place: row i's beams still use
    names[i], so the answer equals that row generated alone with its adapter set."""
    model, tokenizer = lorakit.load_base(folder, device="cpu")
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter=name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, parameter in lorakit.lora_parameters(model, name):
                if key.endswith("lora_B"):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    texts = ["Hello", TEXT[0]]
    kwargs = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "left"
    # transformers 4.x's plain fast tokenizer also returns token_type_ids, which generate refuses for Llama
    batch = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with lorakit.mixed_batch(model, ["a", "b"]):
        together = model.generate(**batch, **kwargs)[:, batch.input_ids.shape[1]:]
    for row, (text, name) in enumerate(zip(texts, ["a", "b"])):
        lorakit.set_adapter(model, name)
        alone = tokenizer([text], return_tensors="pt", return_token_type_ids=False)
        assert together[row].tolist() == model.generate(**alone, **kwargs)[0, alone.input_ids.shape[1]:].tolist()


def test_a_second_thread_cannot_open_mixed_batch_on_the_same_model():
    model = _two_adapters()
    opened, release, seen = threading.Event(), threading.Event(), []

    def hold():
        with lorakit.mixed_batch(model, ["a", "b"]):
            opened.set()
            release.wait(30)

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert opened.wait(30)
        with pytest.raises(LorakitError, match="another thread has a mixed_batch block open on this model"):
            with lorakit.mixed_batch(model, ["b", "a"]):
                seen.append("entered")
        with lorakit.mixed_batch(_two_adapters(seed=1), ["b", "a"]):  # another model is free
            seen.append("other model")
    finally:
        release.set()
        worker.join(30)
    assert seen == ["other model"]
    with lorakit.mixed_batch(model, ["b", "a"]):  # free again once the other thread left
        model(torch.randint(0, 128, (2, 3)))


def test_merge_twice_unmerge_twice_then_merge_and_unload_and_save(tmp_path):
    model = _two_adapters()
    ids = torch.randint(0, 128, (2, 7))
    layer = model.model.layers[0].self_attn.q_proj
    original = layer.base_layer.weight.detach().clone()
    expected = model(ids).logits
    lorakit.merge(model)
    once = layer.base_layer.weight.detach().clone()
    lorakit.merge(model)  # already merged: nothing is added twice
    assert torch.equal(layer.base_layer.weight, once)
    assert_close(model(ids).logits, expected)
    lorakit.unmerge(model)
    lorakit.unmerge(model)
    assert_close(layer.base_layer.weight, original)
    assert_close(model(ids).logits, expected)

    plain = lorakit.merge_and_unload(model)
    with pytest.raises(LorakitError) as error:
        lorakit.save_adapter(plain, tmp_path / "adapter")
    assert "(no adapters)" in _one_line(error)  # io.py's own line
    with pytest.raises(LorakitError, match="no lorakit adapters .*after merge_and_unload it is a plain model: save it "
                                           "with model.save_pretrained"):
        lorakit.set_adapter(plain, "a")
    assert_close(plain(ids).logits, expected)
    for again in (lorakit.merge, lorakit.merge_and_unload):  # a plain model: "merging" would save the bare base
        with pytest.raises(LorakitError, match="this model has no lorakit adapters to merge; load one first"):
            again(plain)


def test_adapter_round_trip_through_a_unicode_path_and_a_second_load_under_one_name(tmp_path):
    model = _two_adapters()
    folder = tmp_path / "Ünïcödé adaptér 中文"
    lorakit.save_adapter(model, folder, adapter="a")
    fresh = tiny_llama(initializer_range=0.3)
    lorakit.load_adapter(fresh, folder, adapter="a")
    ids = torch.randint(0, 128, (2, 5))
    lorakit.set_adapter(model, "a")
    assert_close(fresh(ids).logits, model(ids).logits)
    with pytest.raises(LorakitError, match="already has an adapter named 'a'; pass another name or delete it first"):
        lorakit.load_adapter(fresh, folder, adapter="a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorakitError, match="exists and is not a folder"):
        lorakit.save_adapter(model, tmp_path / "file", adapter="a")


# -- LoraConfig -------------------------------------------------------------------------------------------------------
def test_lora_config_errors_say_the_value_the_range_and_the_fix():
    cases = [(dict(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM"),  # as peft's tutorials write it
              "LoraConfig has no field 'lora_alpha' (peft's name): write alpha; 'lora_dropout' (peft's name): write "
              "dropout; 'task_type' (peft's name): not needed, leave it out"),
             (dict(use_dora=True), "write variant='dora'"),
             (dict(target_module=["q_proj"]), "'target_module': did you mean 'target_modules'?"),
             (dict(zzz=1), "LoraConfig has no field 'zzz' (its fields: alpha, alpha_pattern, bias,"),
             (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0 (the chance of zeroing"),
             (dict(r=0), "r must be a positive integer, got 0 (a rank such as 8 or 16)"),
             (dict(alpha="16"), "alpha must be a finite number, got '16' (the update is scaled by alpha / r"),
             (dict(variant="DoRA"), "unknown variant 'DoRA' (did you mean 'dora'?)")]
    for kwargs, message in cases:
        with pytest.raises(LorakitError) as error:
            lorakit.LoraConfig(**kwargs)
        assert message in _one_line(error), kwargs
    config = lorakit.LoraConfig(r=4, alpha=8)
    assert config.replace(dropout=0.1).dropout == 0.1 and "alpha" in inspect.signature(lorakit.LoraConfig).parameters


def test_a_pattern_key_that_is_no_regex_is_refused_when_the_config_is_made():
    """LoraConfig(rank_pattern={"(q": 2}) used to pass and crash with re.error inside inject."""
    for kw, key in ((dict(rank_pattern={"(q": 2}), "rank_pattern key '(q'"), (dict(alpha_pattern={"a[": 4}), "alpha_pattern key 'a['")):
        with pytest.raises(LorakitError, match=r"^" + re.escape(key) + " is not a valid regular expression: "):
            lorakit.LoraConfig(**kw)
    assert lorakit.LoraConfig(rank_pattern={r"layers\.0\..*q_proj": 4}).rank_pattern  # a good one still passes


def test_load_base_names_an_lfs_pointer_or_a_cut_weights_file(tmp_path):
    """lorakit.load_base(folder) used to end in safetensors' 'header too large' traceback for both."""
    folder = tiny_hf_folder(tmp_path / "model")
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(LorakitError, match="model.safetensors is a Git LFS pointer, not the weights: run git lfs pull"):
        lorakit.load_base(str(folder))
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LorakitError, match=r"model.safetensors is cut short or not a safetensors file \("):
        lorakit.load_base(str(folder))
    weights.write_bytes(whole)
    assert lorakit.load_base(str(folder))[0] is not None
