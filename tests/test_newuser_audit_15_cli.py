"""Fifteenth new-user audit, the command line: a first hour with `lorakit` and the README, from `lorakit` alone to a
trained adapter answering a prompt.

Each test pins one finding, and fails on the code before its fix. Tiny models throughout (tests/test_train_helpers.py):
no test loads the embedded 135M model.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from lorakit.cli import main
from test_newuser_audit_12_cli import no_load  # noqa: F401  (the fixture: any model load fails the test)
from test_serve_support import make_adapter
from test_train_helpers import make_model_folder, task_records, tiny_train_model, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("cli15") / "tiny")


def _code(argv: list[str]) -> int:
    """main's exit status, also when argparse ends the process itself (SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def _one_line(capsys, argv: list[str]) -> str:
    """Run a command line that must be refused: exit 2, one stderr line, no traceback. Returns the line."""
    code = _code(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


# -- lorakit alone, lorakit help ------------------------------------------------------------------------------------
def test_lorakit_help_command_is_the_commands_help(capsys):
    """`lorakit help train` (git's and pip's way to ask) answered "unknown command 'help'"."""
    assert _code(["help"]) == 0
    assert capsys.readouterr().out.startswith("usage: lorakit [-h] [--version] COMMAND")
    assert _code(["help", "merge"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakit merge") and "--max-shard-size" in out
    line = _one_line(capsys, ["help", "traim"])
    assert line.startswith("lorakit: error: unknown command 'traim'; did you mean 'train'?"), line


def test_every_environment_variable_lorakit_reads_is_in_the_overview_and_the_readme(capsys):
    """LORAKIT_API_KEY and LORAKIT_DISABLE_TRITON were read but written nowhere a user looks: `lorakit --help` named
    no variable, the README only two of the four."""
    names = set()
    for path in (REPO / "lorakit").rglob("*.py"):
        names |= set(re.findall(r"""(?:environ\.get|getenv|environ\[)\(?["'](LORAKIT_[A-Z_]+)""", path.read_text()))
    assert {"LORAKIT_CACHE", "LORAKIT_API_KEY", "LORAKIT_DISABLE_TRITON", "LORAKIT_DISABLE_PDL"} <= names, names
    assert _code(["--help"]) == 0
    overview = capsys.readouterr().out
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in sorted(names):
        assert re.search(rf"^  {name} +\S", overview, re.M), f"`lorakit --help` does not explain {name}"
        assert f"`{name}" in readme, f"README.md does not name {name}"


# -- options typed as other tools (or fingers) type them -------------------------------------------------------------
def test_a_prefix_of_an_option_is_not_taken_for_it(capsys, no_load):
    """argparse took prefixes: `lorakit generate --n 2 hi` ran with --no-chat and the prompt "2" (refusing only
    "hi"), and `lorakit train --epoch 2` started a run that a later --epoch-... option would have broken."""
    line = _one_line(capsys, ["generate", "--n", "2", "hi"])
    assert line == "lorakit generate: error: unrecognized arguments: --n (`lorakit generate --help` lists the options)"
    line = _one_line(capsys, ["train", "--epoch", "2"])
    assert line == ("lorakit train: error: unrecognized arguments: --epoch; did you mean --epochs? (`lorakit train "
                    "--help` lists the options)")
    assert "did you mean --adapters?" in _one_line(capsys, ["serve", "--adapter", "runs/mine"])


def test_a_misspelt_option_is_named_before_a_required_one_is_missed(capsys, no_load):
    """`lorakit merge --adapter A --output merged` said "the following arguments are required: --out": argparse
    checks required options before it lists unknown ones, so the option the user did type went unmentioned."""
    line = _one_line(capsys, ["merge", "--adapter", "a", "--output", "merged"])
    assert line == ("lorakit merge: error: unrecognized arguments: --output; did you mean --out? (`lorakit merge "
                    "--help` lists the options)")
    line = _one_line(capsys, ["quantize", "--model-path", "m", "--out", "o"])
    assert "unrecognized arguments: --model-path; did you mean --model?" in line, line
    # with nothing unknown, the required ones are still said
    line = _one_line(capsys, ["merge", "--adapter", "a"])
    assert "the following arguments are required: --out" in line, line


@pytest.mark.parametrize("argv, meant", [
    (["train", "--lerning-rate", "1e-4"], "--lr"),               # a typo of transformers' name
    (["train", "--use-dora"], "--variant dora"),                 # peft's switch: the option and its value
    (["train", "--bf16"], "--dtype bfloat16"),                   # Trainer's
    (["train", "--load-in-4bit"], "--quantize nf4"),             # bitsandbytes'
    (["merge", "--adapter", "a", "--output-dir", "m"], "--out"),  # Trainer's output_dir on another command
    (["generate", "--max-tokens", "20", "hi"], "--max-new-tokens"),  # OpenAI's and vLLM's
    (["eval", "--max-tokens", "20"], "--max-new-tokens"),
])
def test_other_tools_names_get_the_lorakit_option(capsys, no_load, argv, meant):
    """Another tool's name was suggested only on train and only when spelt exactly (--learning-rate, not
    --lerning-rate); merge's --output-dir and generate's --max-tokens got no hint, and a switch such as --use-dora
    was sent to --variant without the value that does what it did. generate's refusal also listed the prompt ("hi")
    among the unknown arguments, as argparse had taken "20" for the prompt."""
    line = _one_line(capsys, argv)
    flag = next(a for a in argv if a.startswith("--") and a != "--adapter")
    assert line == (f"lorakit {argv[0]}: error: unrecognized arguments: {flag}; did you mean {meant}? "
                    f"(`lorakit {argv[0]} --help` lists the options)")


def test_a_prompt_of_several_words_without_quotes_says_to_quote_it(capsys, no_load):
    # (generate takes several quoted prompts since session 24: one-word ones are refused as one unquoted prompt)
    line = _one_line(capsys, ["generate", "What", "is", "LoRA?"])
    assert line == ('lorakit generate: error: 3 one-word prompts (What is LoRA?): a prompt of several words goes in '
                    'quotes: lorakit generate "Two lattes to Berlin"; for several one-word prompts, use '
                    '--prompts-file')


# -- output into a log file ------------------------------------------------------------------------------------------
def test_merge_into_a_log_has_no_transformers_bar(tiny, tmp_path, capsys):
    """`lorakit merge ... 2> merge.log` wrote transformers' 'Writing model shards' bar into the log: three redraws
    joined by carriage returns. A terminal still gets it; transformers' switch is left as it was."""
    from transformers.utils import logging as hf_logging

    adapter = make_adapter(tiny_train_model(), tmp_path / "adapter", seed=1)
    hf_logging.enable_progress_bar()  # as in a fresh process (a training run in this process turns it off)
    try:
        assert main(["merge", "--model", str(tiny), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.disable_progress_bar()
    captured = capsys.readouterr()
    assert "Writing model shards" not in captured.err and "\r" not in captured.err, captured.err
    assert (tmp_path / "merged" / "config.json").is_file()
    # and it ends with the command that uses the folder (the line before is for Python)
    assert captured.out.strip().splitlines()[-1] == \
        f"next: lorakit generate --model {shlex.quote(str(tmp_path / 'merged'))} 'YOUR PROMPT'"


def test_merge_warns_on_stderr(tiny, tmp_path, capsys):
    """merge's warning that the bf16 cast loses most of a small update went to stdout, between the report lines
    (`lorakit merge ... > merge.txt` hid it); combine and every other command warn on stderr."""
    adapter = make_adapter(tiny_train_model(), tmp_path / "faint", seed=3, std=1e-5)
    assert main(["merge", "--model", str(tiny), "--adapter", str(adapter), "--out", str(tmp_path / "merged"),
                 "--dtype", "bf16"]) == 0
    captured = capsys.readouterr()
    assert "warning: the cast to bfloat16 rounds away" in captured.err, captured
    assert "warning" not in captured.out, captured.out


def test_combine_ends_with_the_command_that_uses_the_new_adapter(tiny, tmp_path, capsys):
    """combine's last line was Python (lorakit.load_adapter / peft) for a user on the command line."""
    adapters = [make_adapter(tiny_train_model(), tmp_path / name, seed=seed) for name, seed in (("a", 1), ("b", 2))]
    out = tmp_path / "a plus b"
    assert main(["combine", "--model", str(tiny), "--adapter", f"{adapters[0]}=0.7", "--adapter", f"{adapters[1]}=0.3",
                 "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"next: lorakit generate --model {shlex.quote(str(tiny))} --adapter {shlex.quote(str(out))} 'YOUR PROMPT'"
    assert main(shlex.split(last.removeprefix("next: lorakit ")) + ["--max-new-tokens", "2"]) == 0


# -- loss_curve.png ---------------------------------------------------------------------------------------------------
def _drawn(monkeypatch, entries: list[dict], tmp_path: Path) -> dict:
    """Plot ``entries`` as a run's metrics.jsonl; returns the axes' legend labels -> their lines, and the x ticks."""
    from matplotlib.figure import Figure

    from lorakit.train.report import plot_loss_curve

    seen = {}
    original = Figure.savefig

    def spy(figure, *args, **kwargs):
        axes = figure.axes[0]
        seen["lines"] = {line.get_label(): line for line in axes.get_lines()}
        seen["xticks"] = [float(t) for t in axes.get_xticks()]
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    write_jsonl(tmp_path / "metrics.jsonl", entries)
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss_curve.png", "lora on tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return seen


def test_loss_curve_smooths_a_long_run_and_marks_the_best_validation(monkeypatch, tmp_path):
    """A 400-step run's per-step loss was one jagged line (batch-to-batch noise of +-0.3 around a trend of 0.1),
    with nothing marking the best validation, the step whose adapter best/ holds."""
    import random

    rng = random.Random(0)
    entries = []
    for step in range(1, 401):
        entries.append({"kind": "train", "step": step, "loss": 3.0 - step / 200 + rng.uniform(-0.3, 0.3)})
        if step % 50 == 0:
            entries.append({"kind": "val", "step": step, "val_loss": abs(step - 250) / 200 + 1.0})
    lines = _drawn(monkeypatch, entries, tmp_path)["lines"]
    smooth = lines["train loss (smoothed)"].get_ydata()
    raw = lines["train loss (per step)"].get_ydata()
    assert len(smooth) == len(raw) == 400
    roughness = lambda ys: sum(abs(b - a) for a, b in zip(ys, ys[1:]))  # noqa: E731
    assert roughness(smooth) < roughness(raw) / 10
    assert abs(smooth[-1] - (3.0 - 400 / 200)) < 0.15  # it follows the trend, without lagging far behind
    best = lines["best validation 1 (step 250)"]
    assert list(best.get_xdata()) == [250] and list(best.get_ydata()) == [1.0]


def test_loss_curve_of_a_one_step_run_shows_its_point_on_whole_steps(monkeypatch, tmp_path):
    """`lorakit train --max-steps 1` drew an empty plot (a line through one point has no length) under x ticks
    0.96, 0.98, 1.00, ... optimizer steps."""
    seen = _drawn(monkeypatch, [{"kind": "train", "step": 1, "loss": 2.5}], tmp_path)
    line = seen["lines"]["train loss"]
    assert line.get_marker() not in (None, "", "None", " ") and list(line.get_xdata()) == [1]
    assert all(tick == int(tick) for tick in seen["xticks"]), seen["xticks"]


# -- a finished run says what to do next, and generate asks its adapter as it was trained ----------------------------
def _train(tiny: Path, tmp_path: Path, records: list[dict], name: str, capsys) -> tuple[Path, str]:
    data = write_jsonl(tmp_path / f"{name}.jsonl", records)
    run = tmp_path / name
    code = main(["train", "--model", str(tiny), "--data", str(data), "--val-fraction", "0.25", "--out", str(run),
                 "--max-steps", "1", "--rank", "2", "--batch-size", "4", "--eval-examples", "0", "--samples", "0",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return run, captured.out


def _encoded(monkeypatch) -> list:
    """What generate hands lorakit.generation.encode_prompt: (prompt, chat) per call."""
    import lorakit.generation as generation

    calls, real = [], generation.encode_prompt

    def spy(tokenizer, prompt, chat=None, chat_template_kwargs=None):
        calls.append((prompt, chat))
        return real(tokenizer, prompt, chat=chat, chat_template_kwargs=chat_template_kwargs)

    monkeypatch.setattr(generation, "encode_prompt", spy)
    return calls


def test_a_prompt_completion_run_ends_with_the_next_command_and_generate_completes_plain_text(
        tiny, tmp_path, capsys, monkeypatch):
    """A run on {"prompt", "completion"} records trains on plain text, but `lorakit generate --adapter RUN/adapter
    "..."` (the next step the overview and the README show) wrapped the prompt in the model's chat template: on the
    embedded model, an adapter at 100% exact match in training answered
    '{"item": "pens", "qty": 3, "item": "pens,item", ...}' instead of '{"item": "pens", "qty": 3, "city": "Oslo"}'.
    The run's last lines also said where its files went but not what to run next."""
    records = task_records(16, seed=3)
    run, out = _train(tiny, tmp_path, records, "plain", capsys)
    results = json.loads((run / "results.json").read_text())
    assert results["prompt_format"] == "plain" and results["system_prompt"] is None
    last = out.strip().splitlines()[-1]
    prompt = records[0]["prompt"]  # as written: "reverse c f h : ", its trailing space part of the prompt trained on
    assert prompt.endswith(": ")
    assert last == (f"next: lorakit generate --model {shlex.quote(str(tiny))} --adapter "
                    f"{shlex.quote(str(run / 'adapter'))} {shlex.quote(prompt)}  |  lorakit eval --model "
                    f"{shlex.quote(str(tiny))} --adapter {shlex.quote(str(run / 'adapter'))}")
    calls = _encoded(monkeypatch)
    argv = shlex.split(last.split("  |  ")[0].removeprefix("next: lorakit "))
    assert main(argv + ["--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert calls == [(prompt, False)], calls
    assert "completed as plain text, as in training (--chat for the chat template)" in err, err
    assert main(argv + ["--max-new-tokens", "2", "--chat"]) == 0  # asked for: the template
    assert calls[-1] == (prompt, True)


def test_a_full_fine_tuning_runs_model_is_asked_as_it_was_trained(tiny, tmp_path, capsys, monkeypatch):
    """`lorakit train --full` on prompt/completion records writes RUN/model, which `lorakit generate --model RUN/model`
    (the run's next: line) wrapped in the chat template like any base."""
    records = task_records(16, seed=6)
    data = write_jsonl(tmp_path / "full.jsonl", records)
    run = tmp_path / "full"
    assert main(["train", "--model", str(tiny), "--data", str(data), "--out", str(run), "--full", "--max-steps", "1",
                 "--batch-size", "4", "--eval-examples", "0", "--samples", "0", "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"next: lorakit generate --model {shlex.quote(str(run / 'model'))} {shlex.quote(records[0]['prompt'])}"
    calls = _encoded(monkeypatch)
    assert main(shlex.split(last.removeprefix("next: lorakit ")) + ["--max-new-tokens", "2"]) == 0
    assert calls == [(records[0]["prompt"], False)], calls
    assert "note: the run trained on text or prompt/completion records" in capsys.readouterr().err


def test_a_chat_run_gives_generate_its_system_prompt(tiny, tmp_path, capsys, monkeypatch):
    """The embedded task's chats all begin with the system turn "Extract the order as JSON.", and the demo adapter
    does its task only under it; `lorakit generate --adapter runs/demo/adapter "Two lattes to Berlin"` had no way to
    send one (no --system), so the README's next step got the chat assistant's answer."""
    system = "reverse or copy"
    records = [{"messages": [{"role": "system", "content": system}, *r["messages"]]}
               for r in task_records(16, seed=4, shape="messages")]
    run, out = _train(tiny, tmp_path, records, "chat", capsys)
    results = json.loads((run / "results.json").read_text())
    assert results["prompt_format"] == "chat" and results["system_prompt"] == system
    assert out.strip().splitlines()[-1].startswith("next: lorakit generate --model ")
    calls = _encoded(monkeypatch)
    base = ["generate", "--model", str(tiny), "--adapter", str(run / "adapter"), "--max-new-tokens", "2"]
    assert main(base + ["copy a b :"]) == 0
    assert calls[-1] == ([{"role": "system", "content": system}, {"role": "user", "content": "copy a b :"}], None)
    assert f"note: system prompt of the training run: {system!r} (--system to change it" in capsys.readouterr().err
    assert main(base + ["--system", "", "copy a b :"]) == 0  # '' for none
    assert calls[-1] == ("copy a b :", None)
    assert main(base + ["--system", "copy only", "copy a b :"]) == 0
    assert calls[-1][0][0] == {"role": "system", "content": "copy only"}
    # beside an adapter from elsewhere (the README's side-by-side comparison), the run's prompt still applies
    foreign = make_adapter(tiny_train_model(), tmp_path / "foreign", seed=5)
    assert main(base + ["--adapter", str(foreign), "--base", "copy a b :"]) == 0
    assert calls[-1][0][0] == {"role": "system", "content": system}
    capsys.readouterr()
    line = _one_line(capsys, base + ["--no-chat", "--system", "x", "copy a b :"])
    assert line == ("lorakit generate: error: --system is a turn of the chat template, which --no-chat turns off; "
                    "drop one")


# -- the docs' command lines -----------------------------------------------------------------------------------------
def test_every_lorakit_command_in_the_docs_names_real_options():
    """tests/test_readme.py parses the README's command lines; docs/*.md named `lorakit serve --decoder auto`,
    `lorakit train --fsdp` and others with nothing checking them. A full command in a shell block must parse; a
    mention in prose (no required arguments) must name options its command has, with values it accepts."""
    import test_readme as readme
    from lorakit.cli import SUBCOMMANDS

    checked = 0
    for path in sorted((REPO / "docs").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        fenced = [argv for language, body in readme.FENCE.findall(text) if language in ("bash", "sh", "console", "")
                  for argv in readme._commands_in(body)]
        spans = [argv for span in readme.INLINE.findall(readme.FENCE.sub("", text)) if span.startswith("lorakit ")
                 for argv in readme._commands_in(span)]
        for argv, whole in [(a, True) for a in fenced] + [(a, False) for a in spans]:
            if not argv or argv[0] not in SUBCOMMANDS:
                continue
            checked += 1
            if whole:
                assert readme._parse(argv) is None, f"{path.name}: `lorakit {shlex.join(argv)}` is refused"
            else:
                _check_mention(path.name, argv)
    assert checked >= 5, "the docs' lorakit commands were not found"


def _check_mention(where: str, argv: list[str]) -> None:
    """Each --option of a prose mention exists on its command and takes the value written after it."""
    from lorakit.cli import build_parser

    sub = build_parser(only=argv[0])._subparsers._group_actions[0].choices[argv[0]]
    for i, token in enumerate(argv[1:], 1):
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        assert flag in sub._option_string_actions, f"{where}: `lorakit {shlex.join(argv)}`: {flag} does not exist"
        action = sub._option_string_actions[flag]
        value = token.split("=", 1)[1] if "=" in token else argv[i + 1] if i + 1 < len(argv) else None
        if action.choices and value is not None and not value.startswith("--"):
            assert value in action.choices, f"{where}: `lorakit {shlex.join(argv)}`: {flag} takes {action.choices}"


def test_a_single_answer_cut_by_max_new_tokens_says_so(tiny, capsys):
    """One answer cut at --max-new-tokens read as the model's whole answer (an adapter's '{"item": "lattes", ...'
    ran on for 128 tokens and ended mid-word); several answers side by side already said "length" in their headers."""
    assert main(["generate", "--model", str(tiny), "--no-chat", "--max-new-tokens", "2", "copy a b :"]) == 0
    err = capsys.readouterr().err
    assert ("note: the answer stopped at --max-new-tokens 2, before its end; raise --max-new-tokens for more"
            in err), err


def test_every_help_fits_a_120_column_terminal(capsys):
    """`lorakit serve --help` printed its description, with the serve extra it needs, as one 151-character line (its
    raw formatter keeps the description as given)."""
    from lorakit.cli import SUBCOMMANDS

    for argv in [["--help"], *[[name, "--help"] for name in SUBCOMMANDS]]:
        assert _code(argv) == 0
        text = capsys.readouterr().out
        assert max(len(line) for line in text.splitlines()) <= 120, (argv, text)
    assert _code(["serve", "--help"]) == 0
    assert "pip install 'lorakit[serve]'" in capsys.readouterr().out


# -- every command line a user may copy: README and docs shell blocks, and each --help's examples -------------------
_BEFORE = {"$", "|", "&&", "||", ";", "nohup", "time", "sudo", "exec", "-m"}


def _copied_commands(text: str) -> list[list[str]]:
    """The argv after each ``lorakit`` of a shell text, wherever a shell would run it: at the start of a line, after
    a prompt (``$``), a pipe, ``&&`` / ``;``, ``nohup`` / ``time``, ``python -m``, or ``VAR=value`` assignments
    (test_readme's finder takes only the first word of a line); a continued line is joined."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line.replace("|", " | ").replace(";", " ; "), comments=True)
        except ValueError:
            continue
        for i, token in enumerate(tokens):
            start = i
            while start > 0 and re.match(r"^\w+=", tokens[start - 1]):  # VAR=value words before the command
                start -= 1
            runs_here = start == 0 or tokens[start - 1] in _BEFORE
            if (token == "lorakit" or token.endswith("/lorakit")) and runs_here:
                argv = tokens[i + 1:]
                end = next((k for k, t in enumerate(argv) if t in ("|", "&&", "||", ";")), len(argv))
                commands.append(argv[:end])
    return commands


def test_every_example_a_user_may_copy_parses():
    """Each `lorakit --help` and `lorakit COMMAND --help` example (`echo "Hi" | lorakit generate ...` among them)
    and every command of a README / docs shell block, also after a prompt, a pipe or an environment variable,
    parses with the real parser: a renamed option cannot leave a stale example behind."""
    import argparse

    import test_readme as readme
    from lorakit.cli import EPILOG, SUBCOMMANDS, build_parser

    sources = {"lorakit --help": EPILOG}
    for name in SUBCOMMANDS:
        sub = next(a for a in build_parser(only=name)._actions if isinstance(a, argparse._SubParsersAction))
        sources[f"lorakit {name} --help"] = sub.choices[name].epilog or ""
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        sources[path.name] = "\n".join(body for language, body in readme.FENCE.findall(path.read_text(encoding="utf-8"))
                                       if language in ("bash", "sh", "console", "shell", ""))
    seen = set()
    for where, text in sources.items():
        for argv in _copied_commands(text):
            if not argv or argv[0] not in SUBCOMMANDS or argv[1:] in ([], ["--help"]):
                continue
            seen.add((where, argv[0]))
            assert readme._parse(argv) is None, f"{where}: `lorakit {shlex.join(argv)}` is refused"
    assert {name for where, name in seen if where.endswith("--help")} == set(SUBCOMMANDS)
    assert ("lorakit generate --help", "generate") in seen and ("README.md", "merge") in seen
