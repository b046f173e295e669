"""``lorakit train`` / ``merge`` / ``generate`` as a new user runs them on data and model folders the project had not
seen (twenty-first follow-up): Alpaca, ShareGPT, OpenAI, Excel and datasets files on tiny random models of several
families with the SmolLM2 tokenizer. Each test's docstring says what was wrong, and fails on the code before its fix.
Tiny models throughout (tests/test_train_helpers.py).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lorakit.cli import main
from test_train_helpers import make_model_folder, write_jsonl


def _without_chat_template(folder: Path) -> Path:
    """The tiny model folder with its tokenizer's chat template removed (a base model's tokenizer: GPT-2, Llama 2
    base, most pre-trained checkpoints have none)."""
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def no_template(tmp_path_factory) -> Path:
    return _without_chat_template(make_model_folder(tmp_path_factory.mktemp("f21") / "base"))


def _encoded(monkeypatch) -> list:
    """What generate hands lorakit.generation.encode_prompt: (prompt, chat) per call."""
    import lorakit.generation as generation

    calls, real = [], generation.encode_prompt

    def spy(tokenizer, prompt, chat=None, chat_template_kwargs=None):
        calls.append((prompt, chat))
        return real(tokenizer, prompt, chat=chat, chat_template_kwargs=chat_template_kwargs)

    monkeypatch.setattr(generation, "encode_prompt", spy)
    return calls


def _train(model: Path, data: Path, out: Path, capsys) -> str:
    code = main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "1",
                 "--rank", "2", "--batch-size", "4", "--eval-examples", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.mark.parametrize("kind", ["alpaca", "question"])
def test_alpaca_records_on_a_tokenizer_without_a_template_are_asked_in_their_prompt_format(
        kind, no_template, tmp_path, capsys, monkeypatch):
    """Alpaca (and question/answer) records on a base tokenizer with no chat template train in Alpaca's prompt format
    ("### Instruction:\\n...\\n\\n### Response:\\n"), but the run's results.json said prompt_format "plain", so the
    `next:` command, `lorakit generate --adapter RUN/adapter "..."`, sent the bare instruction: the adapter never saw
    the "### Response:" cue it learnt to answer after. The next line also showed 'YOUR PROMPT' instead of an
    instruction of the data. Now the run keeps the format (results.json: "alpaca" / "question", with the system text
    every record shares), generate frames the prompt as training did (--no-chat sends it bare), and next: shows an
    instruction."""
    from lorakit.train.formats import validate_record

    system = "copy or reverse"
    if kind == "alpaca":
        records = [{"instruction": f"reverse {a} {b} :", "input": "", "output": f"{b} {a}", "system": system}
                   for a, b in zip("abcdefgh", "bcdefgha")]
    else:
        records = [{"question": f"reverse {a} {b} :", "answer": f"{b} {a}", "system": system}
                   for a, b in zip("abcdefgh", "bcdefgha")]
    data = write_jsonl(tmp_path / f"{kind}.jsonl", records)
    out = _train(no_template, data, tmp_path / "run", capsys)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["prompt_format"], results["system_prompt"]) == (kind, system)
    last = out.strip().splitlines()[-1]
    assert last.endswith(f"--adapter {shlex.quote(str(tmp_path / 'run' / 'adapter'))} 'reverse a b :'"), last

    trained_prompt = validate_record(records[0]).fallback["prompt"]  # what training tokenized before the answer
    calls = _encoded(monkeypatch)
    argv = shlex.split(last.removeprefix("next: lorakit ")) + ["--max-new-tokens", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert calls == [(trained_prompt, False)], calls
    assert "so the prompt is asked in it, after the run's system text 'copy or reverse'" in err, err
    # --system sets another system text in the frame; --no-chat sends the prompt as typed
    assert main(argv + ["--system", "be brief"]) == 0
    assert calls[-1] == (trained_prompt.replace(system, "be brief"), False), calls
    assert main(argv + ["--no-chat"]) == 0
    assert calls[-1] == ("reverse a b :", False), calls


@pytest.fixture(scope="module")
def with_template(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("f21") / "chat")


def test_a_sharegpt_runs_next_command_asks_the_chats_first_turn_and_one_step_is_one_step(
        with_template, tmp_path, capsys):
    """A run on ShareGPT chats ("human" / "gpt" turns, a closing "thanks" exchange) ended with `next: lorakit generate
    ... thanks`: the last user turn of the first chat, which answers turns the one-turn generate does not send; the
    first user turn opens a chat as in training. A --max-steps 1 smoke run also said "done in 3 s: 1 steps"."""
    chats = [{"conversations": [{"from": "human", "value": f"reverse {a} {b} :"}, {"from": "gpt", "value": f"{b} {a}"},
                                {"from": "human", "value": "copy"}, {"from": "gpt", "value": "a"}]}
             for a, b in zip("abcdefgh", "bcdefgha")]
    out = _train(with_template, write_jsonl(tmp_path / "sharegpt.jsonl", chats), tmp_path / "run", capsys)
    lines = out.strip().splitlines()
    assert lines[-1].endswith(" 'reverse a b :'"), lines[-1]
    done = next(line for line in lines if line.startswith("done in "))
    assert ": 1 step, final train loss" in done, done


@pytest.mark.parametrize("typed, meant", [("--eval-examples", "--limit"), ("--max-samples", "--limit"),
                                          ("--eval-data", "--data"), ("--examples", "--limit")])
def test_eval_names_the_option_meant_for_trains_and_other_tools_names(typed, meant, capsys):
    """`lorakit eval --eval-examples 8` (train's name for how many held-out records to score by generation) was
    answered with a bare "unrecognized arguments": eval calls it --limit. --max-samples (transformers' scripts) and
    --examples were offered --samples (how many generations to print), and --eval-data nothing (train's alias of it
    is --val-data, which eval lacks)."""
    from cli_helpers import cli_error

    line = cli_error(capsys, main(["eval", typed, "8"]))
    assert line == f"lorakit eval: error: unrecognized arguments: {typed}; did you mean {meant}? (`lorakit eval --help` " \
                   "lists the options)", line
    assert cli_error(capsys, main(["train", "--eval-data", "x"])).endswith("did you mean --val-data? (`lorakit train "
                                                                        "--help` lists the options)")


def test_long_texts_split_into_windows_train_every_token_once(tmp_path, capsys):
    """Plain-text (pre-training style) records are whole documents, longer than a row: `lorakit train --data
    docs.jsonl` dropped every one ("no examples left"), and --overflow truncate, the one way offered, trained only
    each document's first max_length tokens. --overflow split cuts a text record into windows of max_length tokens,
    overlapping by the one token whose label a window cannot predict, so every token but the first is a target
    exactly once; other records keep the drop rule (a cut answer would be learnt as the whole answer)."""
    from lorakit.errors import LorakitError
    from lorakit.train.data import IGNORE_INDEX, build_dataset, tokenize_example, tokenize_examples
    from test_train_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    words = " ".join("abcdefgh"[(i * 5) % 8] for i in range(23))
    whole = tokenize_examples({"text": words}, tok, 64)[0]
    assert len(whole["input_ids"]) == 24  # the 23 words and <|im_end|>; its first label is never predicted
    windows = tokenize_examples({"text": words}, tok, 8, "split")
    assert [len(w["input_ids"]) for w in windows] == [8, 8, 8, 3]
    targets = [t for w in windows for t in w["labels"] if t != IGNORE_INDEX]
    assert targets == whole["input_ids"][1:]  # every token but the first, once, in order
    for w in windows:  # each window is a slice of the whole text
        assert " ".join(map(str, w["input_ids"])) in " ".join(map(str, whole["input_ids"]))
    # a prompt/completion record longer than max_length is dropped, not cut
    assert tokenize_examples({"prompt": words + " :", "completion": "a"}, tok, 8, "split") == []
    with pytest.raises(LorakitError, match="use tokenize_examples"):
        tokenize_example({"text": words}, tok, 8, "split")
    data = build_dataset([{"text": words}, {"prompt": "copy a :", "completion": "a"}], tok, 8, "split")
    assert (data.summary.examples, data.summary.split_texts, data.summary.dropped) == (5, 1, 0)
    assert "1 text longer than max_length=8 was split into windows of at most 8 tokens" in data.summary.drop_note()

    folder = make_model_folder(tmp_path / "model")
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": " ".join("abcdefgh"[(i * k) % 8] for i in range(40))}
                                                 for k in range(1, 9)])
    argv = ["train", "--model", str(folder), "--data", str(docs), "--out", str(tmp_path / "run"), "--max-steps", "1",
            "--rank", "2", "--batch-size", "4", "--eval-examples", "0", "--no-progress", "--max-length", "16"]
    from cli_helpers import cli_error

    line = cli_error(capsys, main(argv))
    assert line.endswith("or split text records into windows of max_length (--overflow split)"), line
    assert main(argv + ["--overflow", "split"]) == 0
    out = capsys.readouterr().out
    assert "training data: 24 examples (from 8 records: 8 text), 0 dropped" in out, out


@pytest.mark.parametrize("argv, said", [
    (["--lora-bias", "--variant", "dora"], "--lora-bias cannot be used with --variant dora (peft does not support a "
                                           "bias on DoRA's lora_B either); use --variant lora or 'rslora', or "
                                           "--no-lora-bias"),
    (["--lora-bias", "--init", "pissa"], "--lora-bias needs --init default, got --init pissa"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--targets", "("], "--targets '(' is not a valid regular expression"),
    (["--exclude", "q_proj("], "--exclude 'q_proj(' is not a valid regular expression")])
def test_adapter_option_mistakes_are_said_in_the_flags_typed(argv, said, no_template, capsys, monkeypatch):
    """`lorakit train --lora-bias --variant dora` was refused with "lora_bias=True cannot be used with
    variant='dora' ... use variant='lora' or 'rslora', or lora_bias=False": LoraConfig's Python names, which the
    command line has none of (every other option check says --max-length, --rank...). Said before anything loads."""
    from cli_helpers import cli_error

    import lorakit

    monkeypatch.setattr(lorakit, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    line = cli_error(capsys, main(["train", "--model", str(no_template), *argv]))
    assert line.startswith(f"lorakit train: error: {said}"), line


def test_a_relative_base_named_by_an_adapter_is_found_from_another_folder(tmp_path, capsys, monkeypatch):
    """An adapter trained with `--model models/base` records that path as typed (peft does the same), relative to
    where the training ran. `lorakit merge --adapter r/adapter` (no --model) run from runs/ then said "pass --model
    with a local folder of it (lorakit downloads nothing: hf download models/base --local-dir DIR ...)": a
    download command for a folder of the user's own. Now the folder is looked for above the adapter's and named
    from here (../models/base)."""
    from cli_helpers import cli_error

    project = tmp_path / "project"
    make_model_folder(project / "models" / "base")
    write_jsonl(project / "train.jsonl", [{"prompt": "copy a :", "completion": "a"}] * 8)
    monkeypatch.chdir(project)
    assert main(["train", "--model", "models/base", "--data", "train.jsonl", "--out", "runs/r", "--max-steps", "1",
                 "--rank", "2", "--batch-size", "4", "--eval-examples", "0", "--no-progress"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(project / "runs")
    for command in (["merge", "--out", "merged"], ["generate", "hi"]):
        line = cli_error(capsys, main([command[0], "--adapter", "r/adapter", *command[1:]]))
        assert line.endswith("not on the default --model smollm2-135m; pass --model ../models/base (the folder "
                             "'models/base' of where it was trained, it seems)"), line
    assert not (project / "runs" / "merged").exists()
