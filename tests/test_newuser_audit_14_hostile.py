"""Fourteenth new-user audit: hostile and malformed files, as an attacker or a broken download hands them over.

What tests/test_newuser_audit_11_hostile.py, test_io_hardening.py and test_serve_hostile.py leave out. Each test
failed on the code before its fix. Hangs are checked in a child process with a time limit, so a regression fails
the test instead of freezing the suite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_llama
from test_serve_support import make_adapter

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_adapter(tiny_llama(), tmp_path_factory.mktemp("good") / "adapter", seed=3,
                        target_modules=["q_proj", "v_proj"])


def copy_with(good: Path, folder: Path, **change) -> Path:
    """``good``'s weights with its config changed by ``change``."""
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    config = json.loads((good / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    return folder


# -- catastrophic regular expressions -----------------------------------------------------------------------------
_LOAD_EACH = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import lorakit
from conftest import tiny_llama
for folder in sys.argv[2:]:
    model, start = tiny_llama(), time.monotonic()
    try:
        lorakit.load_adapter(model, folder)
        result = "loaded"
    except lorakit.LorakitError as error:
        result = str(error)
    print(json.dumps([result, time.monotonic() - start, lorakit.adapter_names(model)]), flush=True)
"""


def test_a_catastrophic_regex_in_an_adapter_config_is_refused_instead_of_hanging(good, tmp_path):
    # before: load_adapter (so generate / merge / eval) backtracked for good on the first module name; only the
    # server checked target/exclude/rank/alpha patterns, and not layers_pattern
    folders = [
        copy_with(good, tmp_path / "target", target_modules=r"(.*.*)*xyz"),
        copy_with(good, tmp_path / "exclude", exclude_modules=r"(.*.*)*xyz"),
        copy_with(good, tmp_path / "rank", rank_pattern={r"(.*.*)*!": 8}),
        copy_with(good, tmp_path / "layers", layers_to_transform=[0, 1], layers_pattern=r"(.*.*)*xyz"),
        copy_with(good, tmp_path / "fine", target_modules=r".*\.(q_proj|v_proj)", rank_pattern={"q_pr.*": 4}),
    ]
    start = time.monotonic()
    try:
        process = subprocess.run([sys.executable, "-c", _LOAD_EACH, str(HERE), *map(str, folders)],
                                 capture_output=True, text=True, timeout=75)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading an adapter with a catastrophic regex hung (> {time.monotonic() - start:.0f} s)")
    lines = [json.loads(line) for line in process.stdout.splitlines()]
    assert len(lines) == len(folders), process.stderr[-2000:]
    for (message, took, names), folder in zip(lines[:-1], folders):
        assert message.startswith(str(folder / "adapter_config.json") + ": a regular expression"), message
        assert "takes over 2 s" in message and "\n" not in message and took < 15 and names == []
    assert lines[-1][0] == "loaded" and lines[-1][2] == ["default"]  # a sane regex still loads


# -- model folders ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from test_serve_support import tiny_hf_folder

    return tiny_hf_folder(tmp_path_factory.mktemp("model") / "base")


def generate(folder: Path, capsys) -> tuple[int, str]:
    from lorakit.cli import main

    code = main(["generate", "--model", str(folder), "--max-new-tokens", "2", "Hello"])
    return code, capsys.readouterr().err


DEEP = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("name, words", [
    ("tokenizer_config.json", "tokenizer_config.json: not a tokenizer file lorakit can read"),
    ("generation_config.json", "generation_config.json is nested too deeply to be a generation config"),
])
def test_a_deeply_nested_json_file_in_a_model_folder_is_one_line(model_folder, tmp_path, capsys, name, words):
    # before: a RecursionError traceback (lorakit's own reads caught ValueError only)
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    (folder / name).write_text(DEEP)
    code, err = generate(folder, capsys)
    lines = [line for line in err.splitlines() if line.startswith("lorakit generate: error:")]
    assert code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err, err[-2000:]


_GENERATE_EACH = """
import contextlib, io, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))  # the old code's allocation fails, not the machine
from lorakit.cli import main
for folder in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["generate", "--model", folder, "--max-new-tokens", "2", "Hello"])
    print(code, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "", flush=True)
"""


def test_a_config_json_far_larger_than_its_weights_is_refused_before_allocating(model_folder, tmp_path):
    # before: transformers built the model first: hidden_size 10**7 asked for 14 GB (terabytes on a real model's
    # vocabulary), num_hidden_layers 10**6 built layers for hours; the weights' shapes were compared only after
    import shutil

    folders = []
    for name, change in {"wide": {"hidden_size": 10**7}, "deep": {"num_hidden_layers": 10**6}}.items():
        folder = tmp_path / name
        shutil.copytree(model_folder, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        folders.append(folder)
    start = time.monotonic()
    try:
        process = subprocess.run([sys.executable, "-c", _GENERATE_EACH, *map(str, folders)], capture_output=True,
                                 text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a config.json of 10**6 layers was still being built after {time.monotonic() - start:.0f} s")
    from safetensors import safe_open

    with safe_open(model_folder / "model.safetensors", framework="pt") as handle:
        saved = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    lines = process.stdout.splitlines()
    assert len(lines) == 2, process.stderr[-2000:]
    for line, folder, field in zip(lines, folders, ("hidden_size 10000000", "num_hidden_layers 1000000")):
        assert line.startswith(f"2 lorakit generate: error: {folder / 'config.json'} describes a model of "), line
        assert field in line and f"but its weights hold {saved:,}:" in line


def test_a_config_json_of_minus_one_layers_is_refused(model_folder, tmp_path, capsys):
    # before: transformers built a model of no layers, left the weights unused, and generate answered with it
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": -1}))
    code, err = generate(folder, capsys)
    assert code == 2 and err.strip() == (f"lorakit generate: error: {folder / 'config.json'}: num_hidden_layers is -1, "
                                         "but it must be a positive integer; use the config.json saved with the weights")


# -- absurd numbers in adapter_config.json ------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, words", [
    ("lora_alpha", 1e300, "lora_alpha 1e+300 is beyond float32's range (3.4e38)"),  # before: loaded, logits inf/NaN
    ("lora_alpha", 10**400, "lora_alpha <an integer of about 400 digits> is beyond"),  # before: OverflowError
    ("alpha_pattern", {"q_proj": -1e39}, "alpha_pattern['q_proj'] -1e+39 is beyond"),
    # before: a shape error quoting every digit of the rank (8 KB for 10**4000; the server's --max-rank refusal too)
    ("r", 10**4000, "r <an integer of about 4000 digits> is larger than any layer (2**31 or more)"),
    ("r", 1e300, "r <an integer of about 300 digits> is larger than any layer"),
    ("rank_pattern", {"q_proj": 2**31}, "rank_pattern['q_proj'] 2147483648 is larger than any layer"),
])
def test_an_alpha_beyond_float32_or_a_rank_beyond_any_layer_is_refused(good, tmp_path, field, value, words):
    import lorakit

    folder = copy_with(good, tmp_path / "adapter", **{field: value})
    model = tiny_llama()
    with pytest.raises(lorakit.LorakitError) as info:
        lorakit.load_adapter(model, folder)
    assert str(info.value).startswith(f"{folder / 'adapter_config.json'}: {words}"), str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600 and lorakit.adapter_names(model) == []


def _safetensors_like(original: bytes, change) -> bytes:
    """``original`` (a safetensors file) with its header changed by ``change(header)``."""
    length = int.from_bytes(original[:8], "little")
    header = json.loads(original[8:8 + length])
    change(header, [key for key in header if key != "__metadata__"])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + original[8 + length:]


def _overlap(header, keys):
    header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]


@pytest.mark.parametrize("kind, words", [
    ("fifo", "model.safetensors is not a regular file (a folder, pipe or device)"),  # before: open() waited forever
    ("folder", "model.safetensors is not a regular file"),
    ("overlap", "model.safetensors is not a valid safetensors file (Error while deserializing header: invalid offset"),
    ("dtype", "model.safetensors is not a valid safetensors file (Error while deserializing header: invalid JSON in "
              "header: unknown variant `F99`"),
    ("overflow", "model.safetensors is not a valid safetensors file (Error while deserializing header: overflow"),
    ("deep", "model.safetensors is cut short or not a safetensors file"),  # before: a RecursionError traceback
])
def test_a_hostile_model_safetensors_is_one_line(model_folder, tmp_path, capsys, kind, words):
    # before: SafetensorError tracebacks from transformers' load (not caught: it derives from Exception alone)
    import os
    import shutil
    import threading

    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.unlink()
    first = lambda header, keys: header[keys[0]]  # noqa: E731
    if kind == "fifo":
        os.mkfifo(weights)
    elif kind == "folder":
        weights.mkdir()
    elif kind == "deep":
        weights.write_bytes((200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000)
    else:
        change = {"overlap": _overlap, "dtype": lambda h, k: first(h, k).update(dtype="F99"),
                  "overflow": lambda h, k: first(h, k).update(shape=[2**40, 2**40])}[kind]
        weights.write_bytes(_safetensors_like(original, change))

    def unblock():  # the old code blocked opening the pipe: a writer that comes and goes lets it fail, not hang
        try:
            os.close(os.open(weights, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader: nothing is blocked

    timer = threading.Timer(10, unblock) if kind == "fifo" else None
    if timer:
        timer.start()
    try:
        code, err = generate(folder, capsys)
    finally:
        if timer:
            timer.cancel()
    assert code == 2 and err.strip().startswith(f"lorakit generate: error: --model {folder}: {words}"), err[-2000:]
    assert len(err.strip().splitlines()) == 1
