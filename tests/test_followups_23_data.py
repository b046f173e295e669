"""A new user's own data and runs with ``lorakit train``, twenty-third audit (lorakit/train/formats.py, config.py,
runner.py).

1. LLaMA-Factory's ShareGPT tool-use records (``conversations`` with ``function_call`` / ``observation`` turns and
   the function schemas in ``tools``, as glaive_toolcall ships them) were refused with "unknown field 'tools'", so
   every record of such a file failed; with 'tools' deleted the calls trained as bare JSON text, without the
   schemas and outside the template's call syntax (Qwen's ``<tool_call>``). They now train as tool calls.
2. A config file's ``val_fraction`` and the flag ``--val-data`` (or a file's ``val_data`` and ``--val-fraction``)
   were refused as "give --val-data or --val-fraction, not both", though flags override the file; and
   ``--val-fraction 0`` (the only way to turn a file's val_fraction off) was refused as "not between 0 and 1".
3. ``--resume RUN --out OTHER`` (OTHER holding no run) was refused as "OTHER: its config.yaml is missing; put it
   back", or, with the options given again, failed after loading on the defaults and left a config.yaml in OTHER.
4. Errors in a ShareGPT record's turns named "messages[i]", an index counted after its ``system`` field was put
   before the turns: ``{"system", "conversations": [human, gpt with a null value]}`` was told of "messages[2]"; an
   Anthropic ``{"system", "messages"}`` record of the turn one after the faulty one. They name the turn as the
   record has it.
5. ``train()`` from Python with an accumulation the rows cannot fill (3 rows, batch 1 x grad_accum 5) cycled the
   data without a word, one optimizer step going through some rows twice; ``lorakit train`` refuses it, and now
   ``train()`` does too, before the model is changed.
"""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train import cli as train_cli
from lorakit.train.data import IGNORE_INDEX, build_dataset
from lorakit.train.formats import validate_record
from test_train_helpers import task_records, tiny_folder, write_jsonl  # noqa: F401 (fixture)
from test_train_tool_calls import TOOLS, family

SCHEMAS = json.dumps([tool["function"] for tool in TOOLS])  # LLaMA-Factory's tools: bare schemas, as JSON text


def llamafactory_record(call: str = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}}),
                        **extra) -> dict:
    return {"conversations": [{"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": call},
                              {"from": "observation", "value": json.dumps({"temperature": 21})},
                              {"from": "gpt", "value": "It is 21 degrees."}], **extra}


def split(tok, example) -> tuple[str, str]:
    ids, labels = example["input_ids"], example["labels"]
    return (tok.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX]),
            tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]))


@pytest.mark.parametrize("name", ["qwen2.5", "hermes", "llama3.1"])
def test_llamafactory_sharegpt_tool_records_train_their_calls(name):
    tok = family(name)
    record = validate_record(llamafactory_record(tools=SCHEMAS, system="You help."), "glaive.json:1")
    [example] = build_dataset([record], tok, max_length=2048)
    context, targets = split(tok, example)
    assert "get_weather" in context and "get_weather" in targets  # the schemas are in the prompt; the call learnt
    assert "temperature" in context and "You help." in context  # the tool's result is context, never learnt
    assert "temperature" not in targets and "Weather in Paris?" not in targets
    assert "It is 21 degrees." in targets and '"city": "Paris"' in targets
    if name != "llama3.1":  # the call in the template's own syntax (Llama 3.1 writes it as bare JSON)
        assert "<tool_call>" in targets
    # parallel calls (a list) and arguments given as JSON text read the same way
    calls = json.dumps([{"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
                        {"name": "get_weather", "arguments": {"city": "Rome"}}])
    record = validate_record(llamafactory_record(calls, tools=SCHEMAS), "glaive.json:2")
    [call] = [m for m in record.fields["messages"] if m.get("tool_calls")]
    assert [c["function"]["arguments"] for c in call["tool_calls"]] == [{"city": "Paris"}, {"city": "Rome"}]


def test_llamafactory_sharegpt_without_tools_keeps_the_call_as_text():
    for tools in ({}, {"tools": ""}):  # no schemas (or an empty cell): the call stays the assistant's text
        messages = validate_record(llamafactory_record(**tools), "x").fields["messages"]
        assert messages[1] == {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'}


@pytest.mark.parametrize("call", ["get_weather(city='Paris')", json.dumps({"arguments": {}}), "[]", "5"])
def test_a_llamafactory_call_that_is_not_json_is_one_line(call):
    with pytest.raises(LorakitError) as error:
        validate_record(llamafactory_record(call, tools=SCHEMAS), "glaive.json:7")
    message = str(error.value)
    assert message.startswith("glaive.json:7: conversations[1] (function_call) must hold a call as JSON") and \
        "remove the record's 'tools' to train the turn as plain text" in message and "\n" not in message


def test_tool_records_on_a_template_without_tool_calls_say_so():
    from test_serve_support import make_tokenizer

    with pytest.raises(LorakitError, match=r"glaive.json:1: conversations\[1\] calls tool 'get_weather', but this model's "
                                           r"chat template does not write tool calls"):
        build_dataset([validate_record(llamafactory_record(tools=SCHEMAS), "glaive.json:1")], make_tokenizer(),
                      max_length=2048)


@pytest.mark.parametrize("record, told", [
    ({"system": "S", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]},
     "f.jsonl:4: conversations[1] (assistant) content must be a string, got null"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
     "f.jsonl:4: conversations[1]: empty completion"),
    ({"system": "S", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     "f.jsonl:4: conversations[0] (user) content must be a string, got int 3"),
    ({"system": "S", "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                                           "weight": 2}]},
     "f.jsonl:4: conversations[1] has weight 2"),
    ({"system": "S", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "f.jsonl:4: messages[1] (assistant) content must be a string, got null"),
    ({"system": "S\ud800", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "f.jsonl:4: field 'system' (system) content holds an unpaired surrogate"),
])
def test_turn_errors_name_the_turn_as_the_record_has_it(record, told):
    with pytest.raises(LorakitError) as error:
        validate_record(record, "f.jsonl:4")
    assert str(error.value).startswith(told), str(error.value)


def _parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_validation_flag_overrides_the_config_files_other_choice(tmp_path):
    (tmp_path / "fraction.yaml").write_text("data: [train.jsonl]\nval_fraction: 0.1\n")
    (tmp_path / "files.yaml").write_text("data: [train.jsonl]\nval_data: [val.jsonl]\n")
    config, _, _ = train_cli.config_from_args(_parse("--config", str(tmp_path / "fraction.yaml"), "--val-data", "v.jsonl"))
    assert (config.val_data, config.val_fraction) == (["v.jsonl"], None)
    config, _, _ = train_cli.config_from_args(_parse("--config", str(tmp_path / "files.yaml"), "--val-fraction", "0.2"))
    assert (config.val_data, config.val_fraction) == (None, 0.2)
    config, _, _ = train_cli.config_from_args(_parse("--config", str(tmp_path / "fraction.yaml"), "--val-fraction", "0"))
    assert (config.val_data, config.val_fraction) == (None, None)  # 0: hold nothing out
    with pytest.raises(LorakitError, match="give --val-data or --val-fraction, not both"):  # both on one layer
        train_cli.config_from_args(_parse("--val-data", "v.jsonl", "--val-fraction", "0.2"))
    for bad in ("-0.1", "1", "1.5"):
        with pytest.raises(LorakitError, match=r"--val-fraction must be between 0 and 1"):
            train_cli.config_from_args(_parse("--val-fraction", bad))


def test_resume_into_another_out_is_refused_before_writing(tmp_path, tiny_folder, capsys):  # noqa: F811
    data = write_jsonl(tmp_path / "train.jsonl", task_records(8, seed=1))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_folder), "--data", str(data), "--out", str(run), "--max-steps", "1",
                 "--rank", "4", "--batch-size", "4", "--eval-examples", "0", "--no-progress"]) == 0
    capsys.readouterr()
    fork = tmp_path / "fork"
    for source in (run, run / "checkpoints" / "step-000001"):
        for extra in ([], ["--model", str(tiny_folder), "--data", str(data), "--max-steps", "2"]):
            assert main(["train", "--resume", str(source), "--out", str(fork), *extra]) == 2
            err = capsys.readouterr().err
            assert f"--resume {source} continues the run in {run}, and --out {fork} is another folder" in err, err
            assert f"lorakit train --resume {fork}" in err and err.count("\n") == 1
            assert not fork.exists()  # nothing written there
    # the run's own folder given as --out, spelt another way, still resumes (nothing left to do here)
    assert main(["train", "--resume", str(run / "checkpoints" / "step-000001"), "--out", str(run) + "/"]) == 0


def test_python_train_refuses_an_accumulation_the_rows_cannot_fill():
    from lorakit.train import TrainConfig, train
    from test_train_helpers import tiny_tokenizer, tiny_train_model

    model, records = tiny_train_model(), task_records(3, seed=1)
    for options, told in ((dict(grad_accum=5), "--batch-size 1 x --grad-accum 5 = 5 examples per optimizer step is "
                           "more than the 3 training rows: one optimizer step would go through them 1.7 times; use "
                           "--grad-accum 3 or less"),
                          (dict(global_batch=4), "--global-batch 4 is more than the 3 training rows")):
        with pytest.raises(LorakitError) as error:
            train(model, tiny_tokenizer(), records, TrainConfig(batch_size=1, eval_examples=0, progress=False, **options))
        assert str(error.value).startswith(told), str(error.value)
    assert not any("lora" in name for name, _ in model.named_parameters())  # refused before an adapter was injected
    assert train(model, tiny_tokenizer(), records, TrainConfig(batch_size=1, grad_accum=3, eval_examples=0, rank=2,
                                                               progress=False)).steps == 1
