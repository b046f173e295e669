"""A new user's first hour with the command line, on data and model folders the other tests do not use.

Data written by other tools (Alpaca, ShareGPT, OpenAI chat files with content parts, ``weight`` and null keys, TSV)
trains; tokenizers whose eos is not the chat template's end of turn train on exactly the text the template writes;
each mistake (a GGUF or config.json as --model, a file as --adapter, a device that is not there, flags that
contradict each other, a model folder as --data) is one line and exit 2, found before the model loads where it can
be; tiny Qwen2 / Gemma / GPT-2 folders go through train -> generate -> merge -> inspect.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train.data import IGNORE_INDEX, generation_prompt, reference_text, tokenize_example, tokenizer_info
from lorakit.train.formats import read_records, validate_record
from cli_helpers import cli_error
from test_serve_support import CHATML, make_tokenizer
from test_train_helpers import tiny_folder, write_jsonl  # noqa: F401 (fixture)

FAST = ["--rank", "2", "--batch-size", "2", "--no-progress", "--eval-examples", "0", "--max-steps", "2"]


def _base_tokenizer(chat_template: str | None = CHATML, pad: bool = True):
    """The test BPE with eos <|endoftext|>, as a base model's tokenizer that carries an instruct template (Qwen2.5
    base, Gemma): the template ends turns with <|im_end|>, which is not eos."""
    from transformers import PreTrainedTokenizerFast

    core = make_tokenizer()._tokenizer
    kwargs = {"pad_token": "<|endoftext|>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=chat_template, **kwargs)


# -- records from other tools ---------------------------------------------------------------------------------------
def test_alpaca_sharegpt_and_openai_chat_records(tmp_path):
    chat_tok, plain_tok = make_tokenizer(), _base_tokenizer(chat_template=None)
    alpaca = validate_record({"instruction": "Reverse the words.", "input": "a b c", "output": "c b a"}, "x:1")
    assert alpaca.shape == "messages" and alpaca["messages"] == [
        {"role": "user", "content": "Reverse the words.\n\na b c"}, {"role": "assistant", "content": "c b a"}]
    assert reference_text(alpaca) == "c b a"
    # with a chat template it trains as that chat; without one, in Alpaca's own prompt format
    as_chat = tokenize_example(alpaca, chat_tok, 128)
    assert chat_tok.decode(as_chat["input_ids"]) == chat_tok.apply_chat_template(alpaca["messages"], tokenize=False)
    as_text = tokenize_example(alpaca, plain_tok, 128)
    text = plain_tok.decode(as_text["input_ids"])
    assert text == "### Instruction:\nReverse the words.\n\n### Input:\na b c\n\n### Response:\nc b a<|endoftext|>"
    targets = plain_tok.decode([t for t, lab in zip(as_text["input_ids"], as_text["labels"]) if lab != IGNORE_INDEX])
    assert targets == "c b a<|endoftext|>"
    assert plain_tok.decode(generation_prompt(alpaca, plain_tok)).endswith("### Response:\n")
    no_input = validate_record({"instruction": "Say hi", "input": "", "output": "hi", "system": "Be kind."})
    assert [m["role"] for m in no_input["messages"]] == ["system", "user", "assistant"]
    assert no_input.fallback["prompt"] == "Be kind.\n\n### Instruction:\nSay hi\n\n### Response:\n"

    sharegpt = validate_record({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                                                  {"from": "gpt", "value": "hello"}]})
    assert [m["role"] for m in sharegpt["messages"]] == ["system", "user", "assistant"]

    # OpenAI chat files: content as a list of text parts, null keys, and weight 0 on a turn not to learn
    openai = validate_record({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}], "name": None},
        {"role": "assistant", "content": "draft", "weight": 0, "tool_calls": None},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "final", "weight": 1}]})
    assert openai["messages"][0] == {"role": "user", "content": "hello"}
    example = tokenize_example(openai, chat_tok, 128)
    targets = chat_tok.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX])
    assert targets == "final<|im_end|>"  # the weight-0 turn is context only

    (tmp_path / "d.tsv").write_text("prompt\tcompletion\r\ncopy a, b\ta, b\r\n", encoding="utf-8")
    assert [dict(r.fields) for r in read_records(tmp_path / "d.tsv")] == [{"prompt": "copy a, b", "completion": "a, b"}]

    for bad, message in (
            ({"instruction": "x", "output": "y", "text": "z"}, r"x:1: unknown field 'text'; an Alpaca record has only"),
            ({"instruction": "x", "output": " "}, "x:1: empty output"),
            ({"conversations": [{"from": "robot", "value": "x"}]}, r"conversations\[0\] is from 'robot'; expected one"),
            ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
                           {"role": "assistant", "content": "a"}]}, r"content\[0\] is a 'image_url' part; lorakit trains"),
            ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
             "every assistant turn has weight 0"),
            ({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
             "weight is 0 or 1, on assistant turns only"),
            ({"messages": [{"role": "user", "content": "q", "audio": {"id": "x"}}, {"role": "assistant", "content": "a"}]},
             r"messages\[0\] has unknown key 'audio'"),
            ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                                                "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
             r"tool_calls\[0\] \(f\) arguments are not JSON")):
        with pytest.raises(LorakitError, match=message):
            validate_record(bad, "x:1")


TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_openai_tool_calls_reach_the_template_or_are_refused():
    """OpenAI tool use: tools and tool calls (arguments as a JSON string, content null) are rendered by a template
    that supports them, and the call is the target; a template that drops them is refused, not trained on."""
    record = {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
              "messages": [{"role": "user", "content": "Weather in Paris?"},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"id": "c1", "type": "function",
                                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                           {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                           {"role": "assistant", "content": "Sunny."}],
              "parallel_tool_calls": False}
    tools_tok = make_tokenizer()
    tools_tok.chat_template = TOOL_TEMPLATE
    example = tokenize_example(record, tools_tok, 256)
    text = tools_tok.decode(example["input_ids"])
    assert text.startswith('<|im_start|>system\nTools: [{"type": "function", "function": {"name": "get_weather"')
    targets = tools_tok.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX])
    assert targets == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>Sunny.<|im_end|>'
    with pytest.raises(LorakitError, match="calls tool 'get_weather', but this model's chat template does not write"):
        tokenize_example(record, make_tokenizer(), 256)


def test_data_files_windows_and_config_files_write(tmp_path):
    """UTF-16 with a BOM (PowerShell 5's `>`), a glob pattern (a config file's `data: shards/*.jsonl`, which no shell
    expands), and folders that are not data."""
    (tmp_path / "shards").mkdir()
    (tmp_path / "u16.jsonl").write_bytes('{"text": "héllo"}\r\n{"text": "bye"}\r\n'.encode("utf-16"))
    records = read_records(tmp_path / "u16.jsonl")
    assert [r["text"] for r in records] == ["héllo", "bye"] and records[1].where == "u16.jsonl:2"
    (tmp_path / "array.jsonl").write_text('[\n  {"text": "a"},\n  {"text": "b"}\n]\n')  # a JSON array named .jsonl
    assert [r["text"] for r in read_records(tmp_path / "array.jsonl")] == ["a", "b"]
    (tmp_path / "array.jsonl").write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    with pytest.raises(LorakitError, match=r"array.jsonl:4: malformed JSON"):
        read_records(tmp_path / "array.jsonl")
    for i in (2, 1):
        write_jsonl(tmp_path / "shards" / f"part-{i}.jsonl", [{"text": f"shard {i}"}])
    assert [r["text"] for r in read_records(tmp_path / "shards" / "part-*.jsonl")] == ["shard 1", "shard 2"]
    with pytest.raises(LorakitError, match="matches no file"):
        read_records(tmp_path / "shards" / "*.csv")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("rank: 2\n")
    write_jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    with pytest.raises(LorakitError, match="is a lorakit run folder"):
        read_records(run)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(LorakitError, match="is an adapter folder"):
        read_records(tmp_path / "adapter")


def test_chats_end_each_turn_with_the_templates_token_not_eos():
    """A base tokenizer (eos <|endoftext|>) with a ChatML template: the tokens trained on are exactly the template's
    text (no eos pushed inside a multi-turn chat), each answer is supervised through <|im_end|>, and the newline
    after it is not a target; prompt/completion records still end with eos."""
    tok = _base_tokenizer()
    info = tokenizer_info(tok)
    assert tok.convert_ids_to_tokens([info.eot_id, info.chat_eot_id]) == ["<|endoftext|>", "<|im_end|>"]
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
            {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]
    example = tokenize_example({"messages": chat}, tok, 128)
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(chat, tokenize=False)
    targets = [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(targets) == "world<|im_end|>fine<|im_end|>"
    pc = tokenize_example({"prompt": "hello ", "completion": "world"}, tok, 128)
    assert tok.decode(pc["input_ids"]) == "hello world<|endoftext|>"
    explicit = tokenizer_info(tok, eot_token="<|endoftext|>")  # an explicit end of turn is used for chats too
    assert explicit.chat_eot_id == explicit.eot_id


# -- mistakes -------------------------------------------------------------------------------------------------------
def test_mistakes_are_one_line_before_anything_loads(tmp_path, tiny_folder, capsys, monkeypatch):
    import lorakit.train.runner as runner

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    pickled = tmp_path / "pickled"  # only pytorch_model.bin: refused (never unpickled), as is a folder without config
    shutil.copytree(tiny_folder, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02 not to be unpickled")
    no_config = tmp_path / "no-config"
    shutil.copytree(tiny_folder, no_config, ignore=shutil.ignore_patterns("config.json"))
    for command in (["generate", "--model", str(pickled), "hi"], ["merge", "--model", str(pickled), "--adapter",
                    str(tmp_path / "no-adapter"), "--out", str(tmp_path / "m0")], ["generate", "--model", str(no_config), "hi"]):
        line = cli_error(capsys, main(command))
        assert "never unpickles" in line or "has no config.json" in line, line

    monkeypatch.setattr(runner, "load_model", no_loading)
    monkeypatch.setattr("lorakit.load_base", no_loading)
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "a b"}] * 4)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "", {"text": "b"}, '{"text": "c",', {"text": "d"}])
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    train = ["train", "--model", str(tiny_folder), *FAST, "--out"]
    cases = [
        ([*train, str(tmp_path / "r1"), "--data", str(bad)], r"bad.jsonl:4: malformed JSON"),
        ([*train, str(tmp_path / "r2"), "--data", str(tiny_folder)], "is a model folder (config.json + safetensors), not training data"),
        (["train", "--model", str(tmp_path / "model.gguf"), "--data", str(good), "--out", str(tmp_path / "r3")],
         "is a GGUF file; lorakit trains and merges Hugging Face folders"),
        (["train", "--model", str(tiny_folder / "config.json"), "--data", str(good), "--out", str(tmp_path / "r4")],
         f"is a file, not a model folder; did you mean its folder '{tiny_folder}'?"),
        ([*train, str(tmp_path / "r5"), "--data", str(good), "--full"], "--full trains every weight, so --rank would be ignored"),
        ([*train, str(tmp_path / "r5"), "--resume", "--overwrite"], "--resume continues a run and --overwrite starts it"),
        (["generate", "--model", str(tiny_folder), "--adapter", str(good), "hi"], "is a file, not an adapter folder"),
        (["generate", "--model", str(tiny_folder), "--device", "tpu9", "hi"], "--device 'tpu9' is not a device"),
        (["merge", "--model", str(tiny_folder), "--adapter", str(tmp_path), "--out", str(tmp_path / "m"), "--gguf-type",
          "q8_0"], "--gguf-type q8_0 applies to a GGUF file only; add --format gguf"),
        (["eval", "--model", str(tmp_path / "model.gguf")], "is a GGUF file"),
        ([*train, str(tmp_path / "r6"), "--data", str(good), "--adam-beta2", "1"], "--adam-beta2 must be in [0, 1)"),
        # --overwrite clears a run's file names (config.yaml, metrics.jsonl, ...) in --out: never in an input
        ([*train, str(tmp_path), "--data", str(good), "--overwrite"], f"holds or sits inside the training data {good}"),
        ([*train, str(tiny_folder / "run"), "--data", str(good)], "holds or sits inside the model folder"),
        ([*train, str(tmp_path / "r7"), "--data", str(good), "--adam-eps", "0"], "--adam-eps must be a small positive"),
        ([*train, str(tmp_path / "r8"), "--data", str(good), "--min-lr-ratio", "2"], "--min-lr-ratio must be in [0, 1]"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", "--model", str(tiny_folder), "--device", "cuda", "hi"], "no CUDA GPU is visible"))
    for argv, message in cases:
        assert message in cli_error(capsys, main(argv)), argv
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 9))

    monkeypatch.setattr("sys.stdin.isatty", lambda: True)  # `lorakit generate` with no prompt would wait forever
    assert "no prompt: give it as an argument" in cli_error(capsys, main(["generate", "--model", str(tiny_folder)]))

    quantized = tmp_path / "nf4"  # re-quantizing a 4-bit folder is refused (it would only copy or lose more)
    shutil.copytree(tiny_folder, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(config))
    assert "is already quantized (bitsandbytes" in cli_error(capsys, main(["quantize", "--model", str(quantized),
                                                                            "--out", str(tmp_path / "q")]))


def test_repeated_list_flags_add_up():
    """`--data a --data b` trains on both (argparse's default keeps only the last, dropping data without a word)."""
    import argparse

    from lorakit.train import cli as train_cli
    from lorakit.train import eval_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["--data", "a.jsonl", "--data", "b.jsonl", "c.jsonl", "--targets", "q_proj", "--targets", "v_proj"])
    assert args.data == ["a.jsonl", "b.jsonl", "c.jsonl"] and args.targets == ["q_proj", "v_proj"]
    assert "data" not in vars(parser.parse_args([]))  # not given: the config file's value stands
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    assert parser.parse_args(["--data", "a.jsonl", "--data", "b.jsonl"]).data == ["a.jsonl", "b.jsonl"]


def test_json_config_files_and_typos_through_other_tools_names(tmp_path, capsys, monkeypatch):
    from lorakit.train.config import read_config_file

    # a config file beside its data, run from elsewhere: the path to write is named (paths are read from the cwd)
    (tmp_path / "project").mkdir()
    write_jsonl(tmp_path / "project" / "train.jsonl", [{"text": "a b"}])
    (tmp_path / "project" / "run.yaml").write_text("data: train.jsonl\n")
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, main(["train", "--config", "project/run.yaml"]))
    assert "data 'train.jsonl' is not found from the current folder, but project/train.jsonl is" in line

    (tmp_path / "run.json").write_text(json.dumps({"rank": 4, "max-steps": 3, "targets": ["q_proj"]}))
    assert read_config_file(tmp_path / "run.json") == {"rank": 4, "max_steps": 3, "targets": ["q_proj"]}
    for text, message in (('{"lerning_rate": 0.1}', r"unknown option 'lerning_rate'; did you mean 'lr'\?"),
                          ('{"rank": 4,\n "alpha": }', r"run.json line 2: malformed JSON"),
                          ('[1, 2]', "expected a mapping of option names")):
        (tmp_path / "run.json").write_text(text)
        with pytest.raises(LorakitError, match=message):
            read_config_file(tmp_path / "run.json")
    import yaml

    from lorakit.train.cli import check_conflicts
    from lorakit.train.config import TrainConfig, dump_yaml

    # a --full run's own resolved config lists every option (rank: 16 ...): passed back, it is not a conflict,
    # while a rank that differs from the default is
    saved = yaml.safe_load(dump_yaml(TrainConfig(full=True)))
    check_conflicts(TrainConfig(**saved), saved, {})
    with pytest.raises(LorakitError, match="--full trains every weight, so --rank, --variant would be ignored"):
        check_conflicts(TrainConfig(**{**saved, "rank": 4}), {**saved, "rank": 4, "variant": "dora"}, {})


# -- other architectures end to end ---------------------------------------------------------------------------------
def _folders(root: Path) -> dict[str, Path]:
    """Tiny random Qwen2 (base tokenizer: eos is not the template's end of turn), Gemma (no pad token) and GPT-2
    (no chat template, no pad token), each saved with save_pretrained beside its tokenizer."""
    import transformers as tf

    torch.manual_seed(0)
    out = {}
    qwen_tok = _base_tokenizer()
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=128)
    gemma_tok = _base_tokenizer(pad=False)
    gpt2_tok = _base_tokenizer(chat_template=None, pad=False)
    models = {
        "qwen2": (tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=len(qwen_tok), **small)), qwen_tok),
        "gemma": (tf.GemmaForCausalLM(tf.GemmaConfig(vocab_size=len(gemma_tok), head_dim=16, **small)), gemma_tok),
        "gpt2": (tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(gpt2_tok), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                                  bos_token_id=gpt2_tok.eos_token_id, eos_token_id=gpt2_tok.eos_token_id)),
                 gpt2_tok),
    }
    for name, (model, tok) in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_other_architectures_train_generate_merge_inspect(tmp_path, capsys):
    from safetensors.torch import load_file

    folders = _folders(tmp_path)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl",
                         [{"instruction": "Reverse the words.", "input": f"{a} {b}", "output": f"{b} {a}"}
                          for a, b in (("red", "blue"), ("one", "two"), ("cat", "dog"), ("up", "down"))])
    chats = tmp_path / "chats.json"  # a JSON array file with a BOM: multi-turn, a tool turn, content parts
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "Looking."}, {"role": "tool", "content": "sunny"},
                         {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}]}]}
    chats.write_text(json.dumps([chat] * 4), encoding="utf-8-sig")
    for name, data in (("qwen2", chats), ("gemma", chats), ("gpt2", alpaca)):
        folder, run = folders[name], tmp_path / f"run-{name}"
        assert main(["train", "--model", str(folder), "--data", str(data), "--out", str(run), *FAST]) == 0, name
        out = capsys.readouterr().out
        shape = "prompt_completion" if name == "gpt2" else "messages"  # no template: Alpaca's own prompt format
        assert f"training data: 4 examples (4 {shape})" in out, out
        assert ("Alpaca records are trained in Alpaca's prompt format" in out) == (name == "gpt2")
        adapter = run / "adapter"
        assert main(["generate", "--model", str(folder), "--adapter", str(adapter), "--max-new-tokens", "3",
                     "--base", "Reverse the words."]) == 0
        assert capsys.readouterr().out.count("=== ") == 2
        assert main(["merge", "--model", str(folder), "--adapter", str(adapter), "--out", str(tmp_path / f"m-{name}"),
                     "--dtype", "fp32"]) == 0
        assert main(["inspect", str(adapter)]) == 0
        described = capsys.readouterr().out
        assert "rank                  2" in described and str(folder) in described
        merged = load_file(tmp_path / f"m-{name}" / "model.safetensors")
        base = load_file(folder / "model.safetensors")
        changed = [k for k in base if k in merged and not torch.equal(base[k], merged[k])]
        assert changed, name  # the adapter (B moved off zero in two steps) is folded into the weights
