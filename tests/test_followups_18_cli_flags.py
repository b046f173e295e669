"""A single-value option given twice (two command lines pasted together, a script adding a flag its caller also gave)
is refused in one line naming the flag and both values: argparse's ``store`` kept the last value without a word, so
``lorakit train --lr 1e-4 --lr 3e-4`` trained at 3e-4 and ``merge --out x --out y`` wrote y. The same value twice,
boolean switches twice and the options meant to repeat (--data, combine's --adapter, --cors-origin) keep working."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cli_helpers import cli_error
from lorakit.cli import SUBCOMMANDS, build_parser, main
from test_serve_support import make_adapter, tiny_hf_folder
from test_train_helpers import REPO


def _refused(capsys, argv: list[str]) -> str:
    """The one line of a command argparse's parse refuses (main raises SystemExit, as for any argparse refusal)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return cli_error(capsys, exit_info.value.code)


def _sub(command: str) -> argparse.ArgumentParser:
    parser = build_parser(only=command)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _two_values(action: argparse.Action) -> tuple[str, str] | None:
    """Two different values the option accepts, as typed; None for an option with one choice (nothing to conflict)."""
    if action.choices is not None:
        choices = [str(c) for c in action.choices]
        return (choices[0], choices[1]) if len(choices) > 1 else None
    return ("1", "2") if action.type in (int, float) else ("a", "b")


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_single_value_option_of_every_command_given_twice_is_refused_naming_both_values(command, capsys):
    """Each option of each subcommand that stores one value, given twice with different values: one line naming the
    option and both values, from the parse (before anything is loaded or checked). Append / extend options are left
    to repeat, and a --x / --no-x switch given both ways is refused too (the last one won)."""
    checked = 0
    for action in _sub(command)._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag == "--help":
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            line = _refused(capsys, [command, flag, f"--no-{flag[2:]}"])
            assert line == (f"lorakit {command}: error: {flag} and --no-{flag[2:]} were both given; give one "
                            f"(`lorakit {command} --help` lists the options)"), line
            checked += 1
        elif isinstance(action, argparse._StoreAction):
            values = _two_values(action)
            if values is None:
                continue
            first, second = values
            # the second in --flag=value form: the same option either way
            line = _refused(capsys, [command, flag, first, f"{flag}={second}"])
            assert line == (f"lorakit {command}: error: {flag} was given twice ({first!r} and {second!r}); give it "
                            f"once (`lorakit {command} --help` lists the options)"), line
            checked += 1
        else:  # what is left repeats on purpose or is a switch: append, extend, store_true
            assert isinstance(action, (argparse._AppendAction, argparse._ExtendAction, argparse._StoreTrueAction)), \
                (flag, action)
    assert checked >= {"inspect": 0, "demo": 3, "train": 30}.get(command, 3), (command, checked)


def test_the_examples_of_the_brief_and_a_shell_run_print_one_line_without_a_traceback(capsys, tmp_path):
    """The lines a user reads, and the real console entry point: status 2, one stderr line, no traceback."""
    assert _refused(capsys, ["merge", "--model", "a", "--model", "b", "--adapter", "x", "--out", "o"]).startswith(
        "lorakit merge: error: --model was given twice ('a' and 'b'); give it once")
    assert _refused(capsys, ["merge", "--adapter", "x", "--out", "x y", "--out", "z"]).startswith(
        "lorakit merge: error: --out was given twice ('x y' and 'z'); give it once")
    # shown as typed, not as the float argparse made of it
    assert _refused(capsys, ["train", "--lr", "1e-4", "--data", "t.jsonl", "--lr", "3e-4"]).startswith(
        "lorakit train: error: --lr was given twice ('1e-4' and '3e-4'); give it once")
    assert _refused(capsys, ["train", "--resume", "runs/a", "--resume"]).startswith(
        "lorakit train: error: --resume was given twice ('runs/a' and --resume alone); give it once")
    done = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--adapters", str(tmp_path), "--port", "8000",
                           "--port", "9000"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr == ("lorakit serve: error: --port was given twice ('8000' and '9000'); give it once "
                           "(`lorakit serve --help` lists the options)\n"), done.stderr


def test_merge_keeps_its_own_line_for_a_second_adapter(capsys):
    """merge's --adapter appends so that a second one gets the line naming lorakit combine (c14a4aa), not the
    generic one."""
    line = cli_error(capsys, main(["merge", "--adapter", "a", "--adapter", "b", "--out", "o"]))
    assert line.startswith("lorakit merge: error: merge takes one --adapter, got 2 (a, b); to merge their sum, "
                           "combine them into one first: lorakit combine"), line


def test_same_value_twice_switches_twice_and_repeating_options_still_parse():
    """No ambiguity, no refusal: --rank 2 --rank 2 (also 1e-4 and 0.0001: the same number), --overwrite twice,
    --data / --targets extended, --cors-origin and combine's --adapter appended. A parser parses afresh each time
    (what the first parse noted does not refuse the second)."""
    train = _sub("train")
    args = train.parse_args(["--rank", "2", "--rank", "2", "--lr", "1e-4", "--lr", "0.0001", "--overwrite",
                             "--overwrite", "--full", "--full", "--data", "a.jsonl", "--data", "b.jsonl", "c.jsonl"])
    assert (args.rank, args.lr, args.overwrite, args.full, args.data) == (2, 1e-4, True, True,
                                                                          ["a.jsonl", "b.jsonl", "c.jsonl"])
    assert train.parse_args(["--rank", "4"]).rank == 4  # the same parser, a new command line
    serve = _sub("serve").parse_args(["--adapters", "x", "--cors-origin", "http://a", "--cors-origin", "http://b"])
    assert serve.cors_origin == ["http://a", "http://b"]
    combine = _sub("combine").parse_args(["--adapter", "a=0.7", "--adapter", "b=0.3", "--out", "o"])
    assert combine.adapter == ["a=0.7", "b=0.3"]
    evaluate = _sub("eval").parse_args(["--data", "a.jsonl", "--data", "b.jsonl", "--quantize", "nf4", "--quantize",
                                        "nf4"])
    assert (evaluate.data, evaluate.quantize) == (["a.jsonl", "b.jsonl"], "nf4")


def test_a_real_generate_with_a_value_repeated_and_adapters_appended(tmp_path, capsys):
    """End to end on a tiny model: the same --max-new-tokens twice and two --adapter folders run as before."""
    from transformers import AutoModelForCausalLM

    base = tiny_hf_folder(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    one, two = make_adapter(model, tmp_path / "one", seed=1), make_adapter(model, tmp_path / "two", seed=2)
    argv = ["generate", "--model", str(base), "--no-chat", "--adapter", str(one), "--adapter", str(two),
            "--max-new-tokens", "3", "--max-new-tokens", "3", "--device", "cpu", "hello"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "one" in out and "two" in out, out
    with pytest.raises(SystemExit):
        main([*argv[:-1], "--max-new-tokens", "4", "hello"])
    assert "--max-new-tokens was given twice ('3' and '4')" in capsys.readouterr().err
