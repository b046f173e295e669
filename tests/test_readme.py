"""The README cannot drift from the code.

* Every ``lorakit.<name>`` and ``from lorakit... import <name>`` the README mentions exists, and the keyword
  arguments it passes to lorakit functions are accepted by their signatures.
* The README's Python blocks run top to bottom in one session, as a new user would paste them, with
  ``lorakit.load_base`` pointed at a tiny random Llama folder instead of the 135M model (and ``max_steps=200`` cut
  to 2), in a scratch folder holding the files the blocks name (``runs/demo/adapter``, ``train.jsonl``, ...). The
  OpenAI-client block talks to a running ``lorakit serve``: it is only compiled here (tests/test_serve*.py cover
  the endpoints it calls).
* Every ``lorakit <command> ...`` line (code blocks, inline code, the Makefile's ``demo`` recipe) parses with that
  command's real argument parser, and every bare ``--flag [value]`` in the prose is a flag of some command that
  accepts that value.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from test_serve_support import make_adapter, tiny_hf_folder

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang == language]


def prose() -> str:
    """The README without its fenced blocks (inline code spans stay)."""
    return FENCE.sub("", README)


def resolve(dotted: str):
    """``lorakit.a.b`` -> the object, importing submodules as needed; raises if any part is missing."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


# wrappers in lorakit/__init__.py that pass **kwargs on: check keywords against the function that takes them
FORWARDED = {"lorakit.load_base": "lorakit.models.loading.load_base",
             "lorakit.use_fast_kernels": "lorakit.models.fast.use_fast_kernels"}


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def python_sources() -> list[str]:
    """The Python blocks, plus every inline span that parses as a Python expression naming lorakit."""
    sources = blocks("python")
    for span in INLINE.findall(prose()):
        if "lorakit." in span:
            with contextlib.suppress(SyntaxError):
                ast.parse(span)
                sources.append(span)
    return sources


def test_every_lorakit_name_and_keyword_in_the_readme_exists():
    checked = 0
    for source in python_sources():
        tree = ast.parse(source)
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lorakit":
                for alias in node.names:
                    resolve(f"{node.module}.{alias.name}")
                    imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    checked += 1
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (_dotted(node) or "").startswith("lorakit."):
                resolve(_dotted(node))
                checked += 1
            if isinstance(node, ast.Call):
                name = _dotted(node.func) or ""
                name = imported.get(name, name)
                if not name.startswith("lorakit."):
                    continue
                target = resolve(FORWARDED.get(name, name))
                params = inspect.signature(target).parameters
                if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                    continue
                for keyword in node.keywords:
                    assert keyword.arg is None or keyword.arg in params, \
                        f"README calls {name}(..., {keyword.arg}=...), which {target.__qualname__} does not accept"
                    checked += 1
    # names in the prose written as `lorakit.name` (e.g. lorakit.mixed_batch) also exist
    for dotted in set(re.findall(r"\blorakit(?:\.[A-Za-z_]\w*)+", prose())):
        resolve(dotted)
        checked += 1
    assert checked > 30, "the README's Python names were not found: has its layout changed?"


# -- the Python blocks, run as one session -------------------------------------------------------------------------
@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A scratch working folder holding what the README's blocks read, and load_base on a tiny model."""
    import lorakit
    from lorakit.models.loading import load_base as real_load_base

    tiny = tiny_hf_folder(tmp_path / "tiny-base")
    model, _ = real_load_base(str(tiny), device="cpu")
    make_adapter(model, tmp_path / "work" / "runs" / "demo" / "adapter", seed=1)  # what `make demo` leaves
    (tmp_path / "work" / "train.jsonl").write_text(
        "".join('{"prompt": "Order %d pens to Oslo.", "completion": "%d pens"}\n' % (i, i) for i in range(24)))

    def tiny_load_base(name_or_folder="smollm2-135m", **kwargs):
        return real_load_base(str(tiny), **{"device": "cpu", **kwargs})

    monkeypatch.setattr(lorakit, "load_base", tiny_load_base)
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


def test_the_readme_python_blocks_run_top_to_bottom(scratch, capsys):
    import lorakit

    sources = blocks("python")
    assert len(sources) >= 5, "the README's Python blocks were not found"
    namespace: dict = {}
    for index, source in enumerate(sources):
        runnable = source.replace("max_steps=200", "max_steps=2")
        if "base_url=" in source:  # a client of `lorakit serve` (needs the server and the openai package): syntax only
            compile(source, f"README.md python block {index + 1}", "exec")
            continue
        try:
            exec(compile(runnable, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as error:  # name the block: the traceback alone points into exec'd text
            raise AssertionError(f"README python block {index + 1} failed: {error!r}\n{source}") from error
    # what the blocks promise, checked on the objects they left behind
    assert (scratch / "my-adapter" / "adapter_model.safetensors").is_file()
    assert "trainable parameters" in capsys.readouterr().out
    assert not any(isinstance(m, torch.nn.Module) and hasattr(m, "adapters") for m in namespace["plain"].modules())
    if "result" in namespace:
        assert namespace["result"].steps == 2 and Path(namespace["result"].adapter_dir).is_dir()
    assert lorakit.load_base is not None


# -- command lines -------------------------------------------------------------------------------------------------
def _commands_in(text: str) -> list[list[str]]:
    """Each ``lorakit ...`` command of a shell text, as the argv after ``lorakit`` (continuations joined)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, token in enumerate(tokens):
            is_program = token.endswith("/lorakit") or (token == "lorakit" and (i == 0 or tokens[i - 1] == "-m"))
            if is_program:
                commands.append(tokens[i + 1:])
                break
    return commands


def readme_commands() -> list[list[str]]:
    commands = []
    for language in ("bash", "sh", ""):
        for body in blocks(language):
            commands += _commands_in(body)
    for span in INLINE.findall(prose()):
        if span.startswith("lorakit "):
            commands += _commands_in(span)
    demo = re.search(r"^demo:.*\n\t(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert demo, "Makefile has no demo recipe"
    commands += _commands_in(demo.group(1).replace("$(VENV)", ".venv"))
    return commands


def _parse(argv: list[str]) -> int | None:
    """Parse ``argv`` with the real CLI parser; None when it parses, else argparse's exit code."""
    from lorakit.cli import SUBCOMMANDS, build_parser

    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    try:
        parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code
    return None


def test_every_lorakit_command_line_in_the_readme_parses(capsys):
    from lorakit.cli import SUBCOMMANDS

    commands = readme_commands()
    assert len(commands) >= 15, "the README's command lines were not found"
    seen = set()
    for argv in commands:
        if argv and argv[0] in SUBCOMMANDS:
            seen.add(argv[0])
        if len(argv) == 1 and argv[0] in SUBCOMMANDS:  # the name alone (the command table, prose): no arguments given
            continue
        if argv[:1] == ["help"]:  # `lorakit help train`: lorakit.cli reads it as `lorakit train --help`
            argv = [*argv[1:2], "--help"]
        code = _parse(argv)
        if "--help" in argv:
            assert code == 0, f"`lorakit {shlex.join(argv)}` did not print its help"
        else:
            assert code is None, f"README command `lorakit {shlex.join(argv)}` is refused: {capsys.readouterr().err}"
    assert seen == set(SUBCOMMANDS), f"commands the README never shows: {set(SUBCOMMANDS) - seen}"


def _all_actions():
    from lorakit.cli import SUBCOMMANDS, build_parser

    actions = {}
    for name in SUBCOMMANDS:
        sub = build_parser(only=name)._subparsers._group_actions[0].choices[name]
        for option, action in sub._option_string_actions.items():
            actions.setdefault(option, []).append(action)
    return actions


def test_every_flag_named_in_the_prose_exists_with_an_accepted_value():
    actions = _all_actions()
    spans = [span for span in INLINE.findall(prose()) if span.startswith("--")]
    assert len(spans) >= 8, "the README's inline flags were not found"
    for span in spans:
        tokens = span.split()
        flag, values = tokens[0], tokens[1:]
        assert flag in actions, f"README names `{flag}`, which no lorakit command accepts"
        if not values:
            continue
        accepted = False
        for action in actions[flag]:
            try:
                typed = [action.type(v) if action.type else v for v in values]
            except (TypeError, ValueError):
                continue
            accepted = accepted or action.nargs != 0 and (not action.choices or all(v in action.choices for v in typed))
        assert accepted, f"README's `{span}`: no command takes {values} for {flag}"


def test_makefile_targets_do_what_the_readme_says():
    makefile = (REPO / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    test = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert re.search(r"^demo: setup", makefile, re.M) and re.search(r"^test: setup", makefile, re.M)
    assert "lorakit train" in demo and "--data" not in demo and "--model" not in demo  # the embedded demo task
    assert "TRITON_INTERPRET=1" in test and "pytest" in test and "tests" in test
    assert os.path.isfile(REPO / "lorakit" / "data" / "orders_train.jsonl")


def test_generate_labels_runs_compared_side_by_side_apart():
    """The README compares run folders' adapters with `lorakit generate --adapter A --adapter B`: the answers are
    labelled by run (`runs/a/adapter` and `runs/b/adapter` were both "adapter" before)."""
    from lorakit.commands.generate import _names

    assert _names(["runs/a/adapter", "runs/b/adapter/", "runs/b/best", "my-adapter", "x/my-adapter"]) == \
        ["a/adapter", "b/adapter", "b/best", "my-adapter", "my-adapter#2"]


def test_the_readme_config_file_example_is_a_valid_train_config(tmp_path):
    from lorakit.train.config import read_config_file, resolve_config

    (yaml_block,) = blocks("yaml")
    (tmp_path / "run.yaml").write_text(yaml_block)
    values = read_config_file(str(tmp_path / "run.yaml"))
    config = resolve_config(values, {})
    assert config.targets == ["q_proj", "v_proj"] and config.data == ["train.jsonl"] and config.rank == 8
