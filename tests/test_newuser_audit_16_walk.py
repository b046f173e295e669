"""Audit 16: a new user's first hour, walking the README and the ``--help`` texts on a fresh clone, then making the
usual mistakes (a full disk, a killed job, an adapter of another model, a DoRA adapter given to combine). What it
found, kept fixed:

* ``lorakit merge`` and ``lorakit quantize`` on a full disk printed a traceback: safetensors' ``save_file`` reports
  the system's error as a ``SafetensorError`` (an ``Exception``), which the commands' ``except OSError`` missed.
* a new run whose first checkpoint met a full disk said "Free disk space and resume with --resume", while the run
  folder was removed (nothing to resume): ``--resume`` then answered "RUN does not exist".
* ``merge`` / ``combine`` / ``quantize`` stopped by SIGTERM (``timeout``, a batch job's time limit, ``kill``) died on
  the spot and left the hidden half-written output folder (a whole model's size) and not a word; ``lorakit train``
  alone handled SIGTERM as Ctrl-C.
* a peft adapter of another model with other shapes got "warning: ... the shapes fit, but ..." and then the error
  saying the shapes do not fit.
* ``lorakit combine``'s DoRA refusal offered ``lorakit merge --adapter A --out MERGED`` without the ``--model`` given,
  so the pasted command merged into the embedded model and was refused as another base.
* the README said an adapter "is refused on a base other than the one it was trained on"; a base of the same shapes
  is only warned about (by name), since weights are not compared.

Everything runs on a tiny random Llama folder (tests/test_train_helpers.py) on CPU.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from test_train_helpers import REPO, make_model_folder, task_records, write_jsonl

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))  # config.json and the tokenizer fit, no weights file does
from lorakit.cli import main
sys.exit(main(sys.argv[1:]))
"""

PAUSED_WRITE = """
import sys, time
import lorakit.export as export
real = export.copy_notices
def paused(model, folder):  # inside write_folder, after the weights are written into the hidden folder
    real(model, folder)
    print("WRITING", flush=True)
    time.sleep(120)
export.copy_notices = paused
from lorakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("walk16") / "tiny")


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory) -> dict[str, Path]:
    """A plain and a DoRA adapter of ``tiny``, saved by lorakit."""
    import torch

    import lorakit

    root = tmp_path_factory.mktemp("walk16-adapters")
    made = {}
    for name, variant in (("plain", "lora"), ("dora", "dora")):
        model, _ = lorakit.load_base(str(tiny))
        torch.manual_seed(1)
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], variant=variant))
        with torch.no_grad():  # a non-zero update, as after training
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(0, 0.1)
        made[name] = root / name
        lorakit.save_adapter(model, str(made[name]))
    return made


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_a_full_disk_while_writing_the_weights_is_one_line_and_leaves_nothing(command, tiny, adapters, tmp_path):
    """A real write failure (the file-size limit, so safetensors' own write fails as on a full disk): before, a
    SafetensorError traceback; now the commands' one line, with the hidden folder removed."""
    out = tmp_path / "out"
    merge = ["merge", "--model", str(tiny), "--adapter", str(adapters["plain"]), "--out", str(out)]
    args = merge if command == "merge" else ["quantize", "--model", str(tiny), "--out", str(out), "--dtype", "fp32"]
    done = subprocess.run([sys.executable, "-c", LIMITED, *args], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "SafetensorError" not in done.stderr, done.stderr[-3000:]
    assert _last_line(done.stderr) == f"lorakit {command}: error: cannot write {out}: File too large"
    assert not out.exists() and _hidden(tmp_path) == []


def test_safetensors_errors_other_than_a_failed_write_pass_unchanged(tmp_path):
    """Only a write the system refused becomes an OSError (the test above); a damaged file safetensors cannot read
    stays its SafetensorError, which the readers name as such."""
    import safetensors.torch

    from lorakit._fs import safetensors_os_errors

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(Exception) as other, safetensors_os_errors():
        safetensors.torch.load_file(str(bad))
    assert type(other.value).__name__ == "SafetensorError"


def test_a_full_disk_at_a_new_runs_first_checkpoint_says_to_run_the_command_again(tiny, tmp_path, monkeypatch,
                                                                                    capsys):
    """The run folder of a new run that stops before its first checkpoint is removed, so there is nothing for
    --resume: the line said "resume with --resume" and --resume then said the folder does not exist."""
    from lorakit.cli import main
    from lorakit.train import checkpoint

    data = write_jsonl(tmp_path / "train.jsonl", task_records(16, seed=1))
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny), "--data", str(data), "--out", str(run), "--max-steps", "2", "--rank", "4",
            "--batch-size", "4", "--eval-examples", "0", "--no-progress"]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_write_safetensors", disk_full)
        assert main(args) == 2
    line = _last_line(capsys.readouterr().err)
    assert line == (f"lorakit train: error: writing checkpoint {run}/checkpoints/step-000002 failed (No space left on "
                    "device). Free disk space and run the command again")
    assert not run.exists()  # and running it again (the advice) trains the run
    assert main(args) == 0 and (run / "adapter" / "adapter_model.safetensors").is_file()


def test_sigterm_during_a_merge_removes_its_half_written_folder(tiny, adapters, tmp_path):
    """`timeout 1h lorakit merge ...` or a batch job's limit: before, Python's default SIGTERM ended the process on
    the spot with the hidden .out.*.tmp folder (the whole merged model) left beside --out."""
    out = tmp_path / "merged"
    process = subprocess.Popen([sys.executable, "-c", PAUSED_WRITE, "merge", "--model", str(tiny), "--adapter",
                                str(adapters["plain"]), "--out", str(out)], env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.strip() == "WRITING":
                break
        assert _hidden(tmp_path), "the merge was not writing its hidden folder"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]  # 128 + SIGTERM, as `lorakit serve` ends (130: Ctrl-C)
    assert _last_line(err) == "lorakit merge: stopped by SIGTERM" and "Traceback" not in err
    assert not out.exists() and _hidden(tmp_path) == []


def _peft_adapter(folder: Path, hidden: int, base_name: str) -> Path:
    """A LoRA saved by peft itself (no lorakit fingerprint) on a tiny Llama of ``hidden`` width."""
    import peft
    import torch

    from conftest import tiny_llama

    model = tiny_llama(seed=0, vocab_size=32, hidden_size=hidden, intermediate_size=40, num_hidden_layers=2)
    torch.manual_seed(0)
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False)).save_pretrained(str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name  # as peft writes it after from_pretrained("org/name")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_an_adapter_of_other_shapes_is_refused_without_a_warning_that_its_shapes_fit(tiny, tmp_path):
    """Before: 'warning: ... names the base ..., this model is ...; the shapes fit, but ...' and then the error that
    they do not. The name warning stays for an adapter whose shapes do fit."""
    import lorakit
    from lorakit.errors import LorakitError

    wide = _peft_adapter(tmp_path / "wide", 64, "meta-llama/Llama-3.2-1B")
    model, _ = lorakit.load_base(str(tiny))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(LorakitError, match=r"has shape \(4, 64\), but module .* needs \(4, 32\).*"
                                               r"names the base 'meta-llama/Llama-3.2-1B'"):
            lorakit.load_adapter(model, str(wide))
    assert not [w for w in caught if "shapes fit" in str(w.message)], [str(w.message) for w in caught]

    fitting = _peft_adapter(tmp_path / "fitting", 32, "Qwen/Qwen2.5-0.5B")
    with pytest.warns(UserWarning, match="names the base 'Qwen/Qwen2.5-0.5B', this model is .*the shapes fit"):
        lorakit.load_adapter(model, str(fitting))


def test_combines_dora_refusal_gives_a_merge_command_that_works_as_pasted(tiny, adapters, tmp_path, capsys):
    """The merge command in the refusal named no --model: pasted, it merged into the embedded model, which refused
    the adapter as another base's (or converted the embedded model first). It now names the --model given."""
    from lorakit.cli import main

    model = tmp_path / "my base"  # a path with a space: the command must quote it
    model.symlink_to(tiny, target_is_directory=True)
    assert main(["combine", "--model", str(model), "--adapter", str(adapters["plain"]), "--adapter",
                 f"{adapters['dora']}=0.5", "--out", str(tmp_path / "mix")]) == 2
    line = _last_line(capsys.readouterr().err)
    command = re.search(r"merge it into the base instead: (lorakit merge .*? --out MERGED)", line).group(1)
    assert f"--model {shlex.quote(str(model))} " in command
    argv = shlex.split(command.replace("MERGED", shlex.quote(str(tmp_path / "merged"))))[1:]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "merged" / "config.json").is_file()


def test_the_readme_says_which_other_bases_are_refused_and_which_only_warned_about(tiny, adapters, tmp_path):
    """The README promised a refusal on any other base; the check compares architecture and shapes (the
    fingerprint) and, when those fit, warns by name: weights are not compared."""
    import lorakit
    from lorakit.errors import LorakitError

    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert "An adapter is refused on a base other than the one it was trained on" not in readme
    assert "refused on a base of other shapes" in readme and "weights are not compared" in readme

    renamed = tmp_path / "other-model"  # the same shapes and weights under another name: a warning, not a refusal
    # a copy, not a link: a link to the trained-on folder is that folder, and quiet (f0e16f9)
    shutil.copytree(tiny, renamed)
    model, _ = lorakit.load_base(str(renamed))
    with pytest.warns(UserWarning, match="the shapes fit"):
        lorakit.load_adapter(model, str(adapters["plain"]))
    other, _ = lorakit.load_base(str(_other_shapes(tmp_path)))  # another width: the fingerprint differs
    with pytest.raises(LorakitError, match="made for another base model"):
        lorakit.load_adapter(other, str(adapters["plain"]))


def _other_shapes(tmp_path: Path) -> Path:
    """A tiny Llama folder of another width, with the tiny tokenizer."""
    from conftest import tiny_llama
    from test_train_helpers import tiny_tokenizer

    folder = tmp_path / "other-shapes"
    tiny_llama(seed=0, vocab_size=32, hidden_size=64, intermediate_size=40, num_hidden_layers=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_validation_data_in_another_format_than_the_training_data_is_warned_about(tiny, tmp_path):
    """Chats to train on and prompt/completion records to validate with (two files exported differently): the chats
    go through the chat template and the records do not, so the validation loss and exact match measured another
    prompt format, without a word. Now one warning line; data of one format, or --val-fraction, gets none."""
    from lorakit.cli import main

    chats = write_jsonl(tmp_path / "chats.jsonl", task_records(16, seed=1, shape="messages"))
    plain = write_jsonl(tmp_path / "plain.jsonl", task_records(4, seed=2))
    common = ["--model", str(tiny), "--max-steps", "1", "--rank", "4", "--batch-size", "4", "--eval-examples", "0",
              "--no-progress"]
    with warnings.catch_warnings(record=True) as caught:  # the CLI prints each as one 'warning: ...' line
        warnings.simplefilter("always")
        assert main(["train", "--data", str(chats), "--val-data", str(plain), "--out", str(tmp_path / "a"),
                     *common]) == 0
    said = [str(w.message) for w in caught if "another prompt format" in str(w.message)]
    assert said == ["validation data: the training examples are chats (messages), the validation examples "
                    "prompt/completion records (plain text); chats are rendered with the chat template and the others "
                    "as plain text, so the validation loss and exact match score another prompt format than the one "
                    "trained: give the validation data in the training data's shape (or hold out training data: "
                    "--val-fraction 0.1)"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--data", str(chats), "--val-fraction", "0.25", "--out", str(tmp_path / "b"),
                     *common]) == 0
    assert not [w for w in caught if "another prompt format" in str(w.message)]


def test_a_mistyped_model_folder_is_named_as_a_folder_with_the_one_meant(tiny, tmp_path, capsys, monkeypatch):
    """`--model ./tinyy` was told "model './tinyy' is neither an embedded model (smollm2-135m) nor a local folder;
    lorakit loads no models from the internet: download it first": the user had typed a path, to a folder that is
    right there. A path is named as a missing folder, with the close one beside it; a Hub id keeps its own line."""
    from lorakit.cli import main

    monkeypatch.chdir(tiny.parent)
    for typed, said in ((f"./{tiny.name}y", f"model folder ./{tiny.name}y does not exist; did you mean ./{tiny.name}?"),
                        (f"{tiny}x/", f"model folder {tiny}x/ does not exist; did you mean {tiny}?"),
                        (str(tmp_path / "nothing" / "model"), f"model folder {tmp_path}/nothing/model does not exist; "
                         "check the path (lorakit reads local folders and loads no models from the internet)")):
        assert main(["generate", "--model", typed, "hi"]) == 2
        assert _last_line(capsys.readouterr().err) == f"lorakit generate: error: {said}"
    assert main(["generate", "--model", "some-org/some-model", "hi"]) == 2  # an id: how to download it
    assert "looks like a Hugging Face Hub id" in capsys.readouterr().err


def test_demo_on_my_model_ends_with_the_train_command_for_that_model(tiny, tmp_path, capsys):
    """`lorakit demo --model ./my-model` ended with "next: `lorakit train` fine-tunes this model on the embedded
    task in a few minutes": pasted, that trains the embedded SmolLM2, not the model the demo ran."""
    from lorakit.cli import build_parser, main
    from lorakit.commands.demo import next_command

    assert main(["demo", "--model", str(tiny), "--rank", "4", "--prompt", "copy a b"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    command = re.fullmatch(r"next: `(lorakit train [^`]*)` fine-tunes this model on the embedded task .*", line)
    assert command, line
    argv = shlex.split(command.group(1))[1:]
    assert build_parser(only="train").parse_args(argv).model == str(tiny)
    assert next_command("smollm2-135m", True).startswith("`lorakit train` ")  # the embedded model: as before
    plain = next_command("./base model", False)  # no chat template: the embedded chats would be refused
    assert plain.startswith("`lorakit train --model './base model' --data train.jsonl` ")


def test_every_model_option_help_says_it_takes_a_hub_id_from_the_cache():
    """The README's Train section says --model takes an org/name id that `hf download` put in the Hugging Face
    cache (and every command reads it so); each --help said only "embedded name or local folder", so a user who
    reads the help alone ran `hf download ... --local-dir` for nothing, or thought lorakit could not use the cache."""
    from lorakit.cli import SUBCOMMANDS, build_parser

    for command in SUBCOMMANDS:
        parser = build_parser(only=command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        options = {option: action for action in sub._actions for option in action.option_strings}
        if "--model" in options:
            said = options["--model"].help
            assert "org/name id in the Hugging Face cache" in said, (command, said)


def test_the_readmes_decoder_and_server_figures_are_the_spread_docs_performance_reports():
    """The README gave one figure each, 8.2 ms for the 8B step with 64 adapters and 2,453 tokens/s for the server
    (the best run, an earlier session's), while docs/PERFORMANCE.md's later runs measured 7.83-8.44 ms and 1,871 to
    2,180 tokens/s at 8 clients over 8 adapters, saying the server varies with the machine: a reader comparing
    found the README out of date. Both figures are now the docs' spread, each end a number the docs report."""
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    docs = (REPO / "docs" / "PERFORMANCE.md").read_text(encoding="utf-8")
    step = re.search(r"a step of 64 sequences takes (\d+\.\d)-(\d+\.\d) ms", readme)
    assert step, "the README gives the 8B step with 64 adapters as a range"
    low, high = step.groups()
    assert re.search(rf"{re.escape(low)}\d-{re.escape(high)}\d ms", docs), (low, high)
    server = re.search(r"gives ([\d,]+)-([\d,]+) tokens/s to 8 clients spread over 8 adapters", readme)
    assert server, "the README gives the server's tokens/s as a range"
    for figure in server.groups():
        assert figure in docs, figure


def test_an_output_on_a_read_only_mount_is_named_as_read_only_not_a_permission(tiny, adapters, tmp_path, capsys):
    """merge / combine / quantize said "no permission to write in X" of a read-only mount (a container's read-only
    volume), where root has every permission; lorakit train already said "Read-only file system". Needs a real
    read-only mount (root with mount rights); skipped elsewhere."""
    from lorakit.cli import main

    place = tmp_path / "ro"
    place.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(place)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    try:
        for argv in (["merge", "--model", str(tiny), "--adapter", str(adapters["plain"])],
                     ["combine", "--model", str(tiny), "--adapter", str(adapters["plain"])],
                     ["quantize", "--model", str(tiny)]):
            out = place / "out"
            assert main([*argv, "--out", str(out)]) == 2
            assert _last_line(capsys.readouterr().err) == (f"lorakit {argv[0]}: error: --out {out}: cannot write in "
                                                           f"{place} (Read-only file system); choose another --out")
    finally:
        subprocess.run(["umount", str(place)], capture_output=True)


def test_a_mistyped_data_file_gets_the_file_beside_it():
    """`--val-data val.josnl` said "data file not found: val.josnl; check the path", with val.jsonl right there."""
    import tempfile

    from lorakit.errors import LorakitError
    from lorakit.train.sources import read_records

    with tempfile.TemporaryDirectory() as folder:
        write_jsonl(Path(folder) / "val.jsonl", task_records(2))
        with pytest.raises(LorakitError) as typo:
            read_records(Path(folder) / "val.josnl")
        assert str(typo.value) == f"data file not found: {folder}/val.josnl; did you mean {folder}/val.jsonl?"
        with pytest.raises(LorakitError) as other:  # nothing close: the line as before
            read_records(Path(folder) / "test.jsonl")
        assert str(other.value) == (f"data file not found: {folder}/test.jsonl; check the path (JSONL, CSV or a "
                                    "datasets folder)")


def test_serving_a_folder_of_training_runs_says_how_to_serve_their_adapters(adapters, tmp_path):
    """`lorakit serve --adapters runs` (each subfolder a `lorakit train` run holding adapter/ and best/) started a
    server with no adapter, saying of each run only that it "holds no adapter_config.json, so it is not an adapter
    folder". The start-up line now names the adapters inside and the two ways to serve them."""
    import shutil

    from lorakit.serve.cli import skipped_folders

    root = tmp_path / "runs"
    for inner in ("adapter", "best"):
        shutil.copytree(adapters["plain"], root / "mine" / inner)
    (root / "notes").mkdir()  # a folder of anything else: the line as before
    assert skipped_folders(str(root)) == [
        ("mine", f"it holds no adapter_config.json, so it is not an adapter folder; its subfolders adapter, best are "
                 f"(a training run?): give --adapters {root}/mine to serve them, or copy one here under a name of its "
                 f"own (cp -r {root}/mine/adapter {root}/mine-adapter)"),
        ("notes", "it holds no adapter_config.json, so it is not an adapter folder")]


def test_a_mistyped_adapters_folder_gets_the_folder_meant(tiny, tmp_path, capsys, monkeypatch):
    """`lorakit serve --adapters ./adaptrs` said "does not exist; create it and put one adapter per subfolder" with
    ./adapters right there."""
    from lorakit.cli import main

    (tmp_path / "adapters").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--model", str(tiny), "--adapters", "./adaptrs"]) == 2
    assert _last_line(capsys.readouterr().err) == ("lorakit serve: error: --adapters ./adaptrs does not exist; did you "
                                                   "mean ./adapters?")
    assert main(["serve", "--model", str(tiny), "--adapters", "elsewhere"]) == 2  # nothing close: as before
    assert "create it and put one adapter per subfolder" in capsys.readouterr().err


def test_a_mistyped_adapter_folder_gets_the_folder_meant_not_a_hub_download(adapters, tmp_path, capsys, monkeypatch):
    """`lorakit inspect runs/mine/adpater` said the folder does not exist, and `runs/nope` was read as a Hub id:
    "download a hub adapter first (hf download runs/nope --local-dir DIR)", though runs/ is a folder right there."""
    import shutil

    from lorakit.cli import main

    monkeypatch.chdir(tmp_path)
    shutil.copytree(adapters["plain"], tmp_path / "runs" / "mine" / "adapter")
    assert main(["inspect", "runs/mine/adpater"]) == 2
    assert _last_line(capsys.readouterr().err) == ("lorakit inspect: error: adapter folder runs/mine/adpater does not "
                                                   "exist; did you mean runs/mine/adapter?")
    assert main(["inspect", "runs/nope"]) == 2
    assert _last_line(capsys.readouterr().err) == (
        "lorakit inspect: error: adapter folder runs/nope does not exist (expected adapter_config.json and "
        "adapter_model.safetensors inside)")
    assert main(["inspect", "some-org/some-adapter"]) == 2  # an org that is no folder here: a Hub id, as before
    assert "hf download some-org/some-adapter --local-dir DIR" in capsys.readouterr().err


def test_an_adapter_whose_targets_this_model_lacks_says_which_model_to_pass(tiny, tmp_path, capsys):
    """A peft GPT-2 adapter given with a Llama --model ended at "target_modules ['c_attn'] matched no module; this
    model's ... (adapter_config.json names the base 'openai-community/gpt2')", without the fix the shape refusals
    get: the CLI's hint looked for 'matches no module', inject says 'matched'."""
    import peft
    import transformers

    from lorakit.cli import main

    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                                                 vocab_size=32))
    folder = tmp_path / "gpt2-adapter"
    peft.get_peft_model(gpt2, peft.LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "openai-community/gpt2"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(tiny), "--adapter", str(folder), "copy a"]) == 2
    line = _last_line(capsys.readouterr().err)
    assert "target_modules ['c_attn'] matched no module" in line, line
    assert line.endswith("; pass --model with a local folder of 'openai-community/gpt2'"), line


def test_train_into_an_adapter_folder_is_refused_even_with_overwrite(adapters, tmp_path, capsys):
    """`lorakit train --out runs/mine/adapter --overwrite` (--out read as "where the adapter goes") trained a run
    inside the adapter folder: --overwrite clears only a run's own file names, so the old adapter_config.json and
    weights stayed at the top, and `--adapter runs/mine/adapter` went on loading the old adapter."""
    import shutil

    from lorakit.cli import main

    folder = tmp_path / "adapter"
    shutil.copytree(adapters["plain"], folder)
    before = sorted(p.name for p in folder.iterdir())
    for extra in ([], ["--overwrite"]):
        assert main(["train", "--data", "train.jsonl", "--out", str(folder), *extra]) == 2
        assert _last_line(capsys.readouterr().err) == (
            f"lorakit train: error: --out {folder} is an adapter folder (adapter_config.json), not a run folder: a run "
            "writes its adapter into OUT/adapter, and an old adapter left here would load instead of the new one; "
            "choose a new folder for --out")
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_learning_rate_typed_without_its_minus_sign_is_refused_with_the_one_meant(capsys):
    """`--lr 2e4` (for 2e-4) trained: the first step moved every weight by ~20000, every later gradient was NaN and
    skipped, and the run ended "done ... final train loss 3.46" with a ruined adapter saved. It is refused before the
    model loads, with the value meant; a learning rate AdamW can train with passes."""
    from lorakit.cli import main
    from lorakit.errors import LorakitError
    from lorakit.train.config import TrainConfig

    assert main(["train", "--data", "train.jsonl", "--lr", "2e4"]) == 2
    assert _last_line(capsys.readouterr().err) == (
        "lorakit train: error: --lr 20000 is far above any learning rate AdamW trains with (LoRA: about 1e-4 to 2e-3; "
        "--full: 1e-5 to 1e-4); did you mean 2e-4?")
    with pytest.raises(LorakitError, match=r"--lr 1 is far above .*to 1e-4\)$"):  # no exponent to flip: no guess
        TrainConfig(lr=1.0)
    assert TrainConfig(lr=0.5).lr == 0.5 and TrainConfig(lr=2e-4).lr == 2e-4


def test_every_command_the_readmes_prose_names_is_written_as_code():
    """"lorakit help train is `lorakit train --help`" read as a sentence about a word: every lorakit command named
    in the README's prose is in backticks, as the test that parses the documented commands expects to find them."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = "help|train|eval|generate|merge|combine|quantize|inspect|serve|demo"
    bare = re.findall(rf".{{0,40}}\blorakit (?:{commands})\b.{{0,20}}", prose)
    assert bare == [], bare


@pytest.mark.skipif(not __import__("shutil").which("make"), reason="no make here")
@pytest.mark.parametrize("where", ["PYTHON", "an old .venv"])
def test_make_setup_with_a_python_older_than_3_11_says_so_before_making_a_venv(where, tmp_path):
    """`make demo` on a machine whose python3 is 3.10 made .venv with it, then pip refused lorakit ("requires a
    different Python"), and every later `make demo PYTHON=python3.11` kept the 3.10 venv (`test -x .venv/bin/python`).
    The README named no Python version at all. Now make stops first, saying which Python and what to run."""
    import shutil

    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    old = "#!/bin/sh\ncase \"$*\" in *platform*) echo 3.10.12;; *version_info*) exit 1;; *) exit 3;; esac\n"
    python = tmp_path / (".venv/bin/python" if where == "an old .venv" else "python3.10")
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text(old)
    python.chmod(0o755)
    done = subprocess.run(["make", "setup", f"PYTHON={tmp_path / 'python3.10'}"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    # make's own lines: "make: ***" alone, "make[1]: ***" under another make (`make test` runs the suite)
    said = [line for line in done.stderr.splitlines() if not re.match(r"make(\[\d+\])?: ", line)]
    if where == "PYTHON":
        assert said == [f"{tmp_path / 'python3.10'} is not Python 3.11 or newer, which lorakit needs: run make "
                        "PYTHON=python3.11 (or a newer one)"]
        assert not (tmp_path / ".venv").exists()
    else:
        assert said == [".venv holds Python 3.10.12; lorakit needs 3.11 or newer: make clean, then make "
                        "PYTHON=python3.11 (or a newer one)"]
    check = re.search(r"\$\(PY\) -c '(import sys; sys.exit\(sys.version_info < \(3, 11\)\))'",
                      (REPO / "Makefile").read_text()).group(1)
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0  # the Python the suite runs on passes it
    assert "lorakit needs Python 3.11 or newer" in (REPO / "README.md").read_text(encoding="utf-8")
