"""``lorakit generate`` for quick checks of adapters (session 24): stop strings, the repetition penalty, JSON lines
out, several prompts (arguments and --prompts-file), and what a new user met on the way (an adapter folder named
"base" printed under the base's own header, ``--adapter __base__``)."""

from __future__ import annotations

import io
import json

import pytest
import torch

import lorakit
from lorakit import generation as G
from lorakit.cli import main
from lorakit.errors import LorakitError
from test_serve_support import never_ending, tiny_folder_with_adapters


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")  # the PyTorch path (fast on CPU); the kernels' tests cover Triton


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny model whose answers never end by themselves (so every answer runs to --max-new-tokens) and two
    adapters of it."""
    found = tiny_folder_with_adapters(tmp_path_factory.mktemp("gen24"))
    never_ending(found["model"])
    return found


def _generate(hf, capsys, *argv) -> tuple[int, str, str]:
    code = main(["generate", "--model", str(hf["model"]), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def _error(hf, capsys, *argv) -> str:
    code, out, err = _generate(hf, capsys, *argv)
    assert code == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# -- --json and several prompts ------------------------------------------------------------------------------------
def test_json_lines_for_every_prompt_and_adapter(hf, capsys):
    alpha, beta = (str(folder) for folder in hf["adapters"])
    code, out, err = _generate(hf, capsys, "--max-new-tokens", "5", "--adapter", alpha, "--adapter", beta, "--base",
                               "--json", "Hello there", "What is LoRA?")
    assert code == 0 and "note" not in err  # stdout holds JSON only: the length note is each line's finish_reason
    lines = _lines(out)
    assert [(line["index"], line["name"], line["adapter"]) for line in lines] == [
        (i, name, folder) for i in (0, 1) for name, folder in (("base", None), ("alpha", alpha), ("beta", beta))]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf["model"])
    for line in lines:
        prompt = ["Hello there", "What is LoRA?"][line["index"]]
        assert line["prompt"] == prompt
        assert line["prompt_tokens"] == len(G.encode_prompt(tokenizer, prompt))
        assert line["completion_tokens"] == 5 and line["finish_reason"] == "length"
        assert isinstance(line["text"], str)
    assert len({line["text"] for line in lines}) == 6  # each adapter answers each prompt its own way


def test_several_prompts_answer_as_each_alone(hf, capsys):
    """Prompts of different lengths share a batch (left-padded); each answer is the one it gets asked alone, greedy
    and with --seed (each row samples from its own generator)."""
    alpha = str(hf["adapters"][0])
    for sampling in ([], ["--temperature", "1.0", "--seed", "7"]):
        common = ["--max-new-tokens", "6", "--adapter", alpha, "--base", "--json", *sampling]
        together = _lines(_generate(hf, capsys, *common, "Hello there", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42")[1])
        alone = _lines(_generate(hf, capsys, *common, "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42")[1])
        assert [line["text"] for line in together[2:]] == [line["text"] for line in alone]


def test_several_prompts_print_a_header_each(hf, capsys):
    code, out, err = _generate(hf, capsys, "--max-new-tokens", "3", "Hello there", "What is LoRA?")
    assert code == 0
    blocks = out.split("\n\n")
    assert blocks[0].startswith("### prompt 1: Hello there\n=== base (3 tokens, length) ===\n")
    assert blocks[1].startswith("### prompt 2: What is LoRA?\n=== base (3 tokens, length) ===\n")


def test_prompts_after_an_option_are_prompts_too(hf, capsys, monkeypatch):
    """nargs="*" takes only the first run of arguments: the quoted prompt after --base was refused as unknown."""
    monkeypatch.setattr("lorakit.commands.generate.BATCH_ROWS", 16)
    code, out, _ = _generate(hf, capsys, "Hello there", "--max-new-tokens", "3", "--json", "What is LoRA?")
    assert code == 0 and [line["prompt"] for line in _lines(out)] == ["Hello there", "What is LoRA?"]


def test_one_word_prompts_are_one_unquoted_prompt(hf, capsys):
    line = _error(hf, capsys, "What", "is", "LoRA?")
    assert line == ('lorakit generate: error: 3 one-word prompts (What is LoRA?): a prompt of several words goes in '
                    'quotes: lorakit generate "Two lattes to Berlin"; for several one-word prompts, use '
                    '--prompts-file')
    line = _error(hf, capsys, "What", "--base", "is", "LoRA?")  # however argparse split them
    assert "3 one-word prompts" in line
    assert "read once" in _error(hf, capsys, "-", "-")


def test_ctrl_c_keeps_the_answers_printed_before_it(hf, capsys, monkeypatch):
    """A long prompts file is answered batch by batch, each printed (and flushed) as it ends: Ctrl-C in the second
    batch leaves the first's lines, then the usual one line and status 130."""
    monkeypatch.setattr("lorakit.commands.generate.BATCH_ROWS", 1)
    calls = []
    real = G.generate

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(G, "generate", interrupted)
    code, out, err = _generate(hf, capsys, "--max-new-tokens", "3", "--json", "Hello there", "What is LoRA?",
                               "Paris is the capital")
    assert code == 130 and err.strip() == "lorakit generate: interrupted"
    assert [line["prompt"] for line in _lines(out)] == ["Hello there"]


# -- --prompts-file ------------------------------------------------------------------------------------------------
def test_prompts_file_lines_and_json_lines(hf, capsys, tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("Hello there\n\n   \nWhat is LoRA?\u2028still the second\r\n", encoding="utf-8")
    code, out, _ = _generate(hf, capsys, "--max-new-tokens", "2", "--json", "first", "--prompts-file", str(text))
    assert code == 0
    # blank lines skipped, CRLF's \r dropped, U+2028 kept inside its line (str.splitlines would split there)
    assert [line["prompt"] for line in _lines(out)] == ["first", "Hello there", "What is LoRA?\u2028still the second"]

    records = tmp_path / "records.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the reference answer"}]
    records.write_text(json.dumps({"prompt": "Hello there", "completion": "ignored"}) + "\n"
                       + json.dumps({"messages": chat}) + "\n", encoding="utf-8")
    code, out, err = _generate(hf, capsys, "--max-new-tokens", "2", "--json", "--prompts-file", str(records))
    assert code == 0
    lines = _lines(out)
    assert lines[0]["prompt"] == "Hello there" and lines[1]["messages"] == chat[:1]
    assert "the last, assistant message of 1 record(s) is left out" in err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf["model"])
    assert lines[1]["prompt_tokens"] == len(G.encode_prompt(tokenizer, chat[:1]))
    # a plain-text file whose first line is a JSON object is read as JSON lines too
    (tmp_path / "plain").write_text(json.dumps({"prompt": "Hello there"}) + "\n", encoding="utf-8")
    code, out, _ = _generate(hf, capsys, "--max-new-tokens", "2", "--json", "--prompts-file", str(tmp_path / "plain"))
    assert code == 0 and _lines(out)[0]["prompt"] == "Hello there"


def test_prompts_file_on_standard_input(hf, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Hello there\nWhat is LoRA?\n")))
    code, out, _ = _generate(hf, capsys, "--max-new-tokens", "2", "--json", "--prompts-file", "-")
    assert code == 0 and [line["prompt"] for line in _lines(out)] == ["Hello there", "What is LoRA?"]


def test_prompts_file_mistakes_are_one_line(hf, capsys, tmp_path):
    missing = tmp_path / "missing.txt"
    assert _error(hf, capsys, "--prompts-file", str(missing)).endswith(f"--prompts-file {missing} does not exist")
    assert "is a folder" in _error(hf, capsys, "--prompts-file", str(tmp_path))
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    assert "holds no prompts" in _error(hf, capsys, "--prompts-file", str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text (byte 0xe9 at offset 3)" in _error(hf, capsys, "--prompts-file",
                                                                  str(tmp_path / "latin1.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hello"}\n{"prompt": "unterminated\n', encoding="utf-8")
    assert f"{bad} line 2 is not a JSON object" in _error(hf, capsys, "--prompts-file", str(bad))
    bad.write_text('{"text": "pretraining text"}\n', encoding="utf-8")
    line = _error(hf, capsys, "--prompts-file", str(bad))
    assert f'{bad} line 1: a record holds "prompt" (text) or "messages" (a chat)' in line and "'text'" in line
    bad.write_text('{"prompt": ""}\n', encoding="utf-8")
    assert '"prompt" must be non-empty text' in _error(hf, capsys, "--prompts-file", str(bad))
    bad.write_text('{"messages": [{"content": "no role"}]}\n', encoding="utf-8")
    assert '"messages" must be a non-empty list' in _error(hf, capsys, "--prompts-file", str(bad))
    array = tmp_path / "prompts.json"
    array.write_text('[{"prompt": "Hello"}]\n', encoding="utf-8")
    assert "holds a JSON array; write JSON lines" in _error(hf, capsys, "--prompts-file", str(array))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    line = _error(hf, capsys, "--no-chat", "--prompts-file", str(chats))
    assert f"{chats} line 1 holds chat messages" in line and "--no-chat turns it off" in line
    assert f"{chats} line 1 begins with a system message of its own" in _error(hf, capsys, "--system", "Be long.",
                                                                               "--prompts-file", str(chats))
    assert "the prompt is empty" in _error(hf, capsys, "   ")
    assert "prompt 2 is empty" in _error(hf, capsys, "Hello there", " ")


# -- --stop ---------------------------------------------------------------------------------------------------------
def test_stop_strings_cut_the_answer_before_them(hf, capsys):
    common = ["--max-new-tokens", "24", "--json", "--adapter", str(hf["adapters"][0])]
    whole = _lines(_generate(hf, capsys, *common, "Hello there")[1])[0]
    assert whole["finish_reason"] == "length" and whole["completion_tokens"] == 24
    text = whole["text"]
    # a stop text from the middle of the answer, and a later one: the answer ends before the earlier
    start = next(i for i in range(len(text) // 3, len(text)) if text[i].isalnum())
    first, later = text[start:start + 2], text[-3:]
    cut = _lines(_generate(hf, capsys, *common, "--stop", later, "--stop", first, "Hello there")[1])[0]
    assert cut["text"] == text[:text.find(first)]
    assert cut["finish_reason"] == "stop" and cut["completion_tokens"] < 24
    # the plain output says it the same way
    code, out, err = _generate(hf, capsys, *[a for a in common if a != "--json"], "--stop", first, "Hello there")
    assert code == 0 and out == text[:text.find(first)] + "\n" and "note" not in err


def test_stop_flag_mistakes(hf, capsys):
    assert _error(hf, capsys, "--stop", "", "hi there") == ("lorakit generate: error: --stop '' is empty; give the "
                                                             "text an answer ends before, e.g. --stop 'User:'")
    code, _, err = _generate(hf, capsys, "--max-new-tokens", "1", "--stop", "\\n", "hi there")
    assert code == 0 and "note: --stop '\\\\n' holds a backslash and an n, not a newline" in err


# -- --repetition-penalty ------------------------------------------------------------------------------------------
def test_repetition_penalty_is_transformers(hf, capsys):
    """--repetition-penalty is transformers' repetition_penalty: greedy answers equal model.generate's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf["model"])
    model = AutoModelForCausalLM.from_pretrained(hf["model"]).eval()
    ids = G.encode_prompt(tokenizer, "Hello there Hello there")
    texts = []
    for penalty in ("1.0", "1.8", "0.5"):
        line = _lines(_generate(hf, capsys, "--max-new-tokens", "12", "--json", "--repetition-penalty", penalty,
                                "Hello there Hello there")[1])[0]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=12, do_sample=False, repetition_penalty=float(penalty),
                                 pad_token_id=tokenizer.pad_token_id)
        assert line["text"] == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), penalty
        texts.append(line["text"])
    assert len(set(texts)) == 3  # the penalty changed the answers


def test_repetition_penalty_per_row_in_the_library(hf):
    """generation.generate applies each row's own penalty (a row without one is unchanged beside one with it)."""
    model, tokenizer = lorakit.load_base(str(hf["model"]))
    ids = G.encode_prompt(tokenizer, "Hello there")
    plain, penalized = G.SamplingParams(max_new_tokens=10), G.SamplingParams(max_new_tokens=10, repetition_penalty=2.0)
    both = G.generate(model, [ids, ids], [None, None], [plain, penalized])
    assert both[0].tokens == G.generate(model, [ids], [None], plain)[0].tokens
    assert both[1].tokens == G.generate(model, [ids], [None], penalized)[0].tokens != both[0].tokens


@pytest.mark.parametrize("value", [0, -1.2, float("nan"), float("inf"), True, "1.2"])
def test_repetition_penalty_values_refused(value):
    with pytest.raises(LorakitError, match="repetition_penalty must be a number above 0"):
        G.SamplingParams(repetition_penalty=value)


def test_repetition_penalty_flag_refused(hf, capsys):
    line = _error(hf, capsys, "--repetition-penalty", "0", "hi there")
    assert line.startswith("lorakit generate: error: --repetition-penalty must be a number above 0")


# -- adapters and the base -----------------------------------------------------------------------------------------
def test_an_adapter_folder_named_base_is_not_the_base(hf, capsys, tmp_path):
    """An adapter folder named "base" was printed under "=== base", the header of the base model's own answer."""
    import shutil

    shutil.copytree(hf["adapters"][0], tmp_path / "base")
    code, out, _ = _generate(hf, capsys, "--max-new-tokens", "3", "--base", "--adapter", str(tmp_path / "base"),
                             "--json", "Hello there")
    assert code == 0
    assert [(line["name"], line["adapter"]) for line in _lines(out)] == [
        ("base", None), (f"{tmp_path.name}/base", str(tmp_path / "base"))]


def test_dunder_base_names_the_base_flag(hf, capsys, monkeypatch, tmp_path):
    """peft's adapter_names call the base "__base__"; generate's --adapter takes folders, and says where the base's
    own answer is. A folder of that name is an adapter like any other."""
    monkeypatch.chdir(tmp_path)
    line = _error(hf, capsys, "--adapter", "__base__", "Hello there")
    assert line == ("lorakit generate: error: --adapter __base__: no such adapter folder; --adapter takes adapter "
                    "folders, and the base model's own answer is --base (beside the adapters')")
    import shutil

    shutil.copytree(hf["adapters"][0], tmp_path / "__base__")
    code, out, _ = _generate(hf, capsys, "--max-new-tokens", "3", "--adapter", "__base__", "--json", "Hello there")
    assert code == 0 and _lines(out)[0]["name"] == "__base__"


def test_a_framed_runs_prompts_are_framed_once_and_shown_as_given(hf, capsys, tmp_path):
    """An adapter of a run that trained Alpaca records asks every prompt in Alpaca's frame (said once, not once per
    prompt); --json's "prompt" is the prompt as given, not the framed text."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(hf["adapters"][0], run / "adapter")
    (run / "config.yaml").write_text(f"model: {hf['model']}\nout: {run}\nrank: 4\nlr: 0.0001\n", encoding="utf-8")
    (run / "results.json").write_text(json.dumps({"prompt_format": "alpaca", "system_prompt": None}), encoding="utf-8")
    code, out, err = _generate(hf, capsys, "--max-new-tokens", "2", "--json", "--adapter", str(run / "adapter"),
                               "Hello there", "What is LoRA?")
    assert code == 0 and err.count("Alpaca's prompt format") == 1
    from transformers import AutoTokenizer

    from lorakit.train.formats import frame_prompt

    tokenizer = AutoTokenizer.from_pretrained(hf["model"])
    lines = _lines(out)
    assert [line["prompt"] for line in lines] == ["Hello there", "What is LoRA?"]
    assert lines[1]["prompt_tokens"] == len(G.encode_prompt(tokenizer, frame_prompt("alpaca", "What is LoRA?"),
                                                            chat=False))
