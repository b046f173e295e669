"""Paths and output folders as a new user types them, through merge / combine / quantize / generate / inspect and
the Python API (regressions of a path and file I/O audit).

``~`` inside ``--out=~/x`` (which the shell leaves alone) is expanded instead of making a folder named ``~``;
``--overwrite`` replaces only a previous output and refuses a folder holding anything else (it used to delete a
user's files silently), an empty folder is used as it is, and the current folder is refused; a merge that fails or
is interrupted leaves the old output as it was; merged files are readable by others; an adapter trained on another
base is named with ``--model`` before the default model loads; editor habits in adapter_config.json (UTF-16,
comments, trailing commas) and broken hub-cache links are named; ``| head`` ends quietly; every ``--help`` has
examples.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import LorakitError
from cli_helpers import cli_error
from test_serve_support import make_adapter, tiny_hf_folder
from test_train_helpers import tiny_folder  # noqa: F401 (fixture)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def adapter(tiny_folder, tmp_path_factory) -> Path:  # noqa: F811 (fixture)
    from transformers import AutoModelForCausalLM

    return make_adapter(AutoModelForCausalLM.from_pretrained(tiny_folder), tmp_path_factory.mktemp("a") / "my adapter ü",
                        seed=3)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fake home folder and a current folder inside tmp_path, so '~' and '.' land there."""
    home = tmp_path / "home ü"
    (home / "work").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    return home


def test_tilde_in_paths_is_the_home_folder(tiny_folder, adapter, home, capsys):  # noqa: F811 (fixture)
    shutil.copytree(adapter, home / "ad")
    assert main(["merge", "--model", str(tiny_folder), "--adapter=~/ad", "--out=~/merged ü", "--dtype", "fp32"]) == 0
    assert (home / "merged ü" / "config.json").is_file() and _names(home / "work") == []  # no folder named '~'
    assert "from_pretrained('" + str(home / "merged ü") in capsys.readouterr().out
    assert main(["combine", "--model", str(tiny_folder), "--adapter=~/ad=0.5", "--out=~/half"]) == 0
    assert main(["inspect", "~/half"]) == 0 and "rank" in capsys.readouterr().out
    assert lorakit.read_adapter("~/half").config.r == 4

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    lorakit.load_adapter(model, "~/ad")
    assert lorakit.save_adapter(model, "~/saved") == home / "saved" and (home / "saved" / "adapter_config.json").is_file()
    assert _names(home / "work") == []


def test_overwrite_replaces_only_a_previous_output(tiny_folder, adapter, tmp_path, capsys, monkeypatch):  # noqa: F811
    merge = ["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--out"]
    combine = ["combine", "--model", str(tiny_folder), "--adapter", f"{adapter}=0.5", "--out"]
    quantize = ["quantize", "--model", str(tiny_folder), "--dtype", "fp32", "--out"]
    for argv, kind in ((merge, "a model"), (combine, "an adapter"), (quantize, "a model")):
        out = tmp_path / f"{argv[0]} out"
        out.mkdir()  # an empty folder (mkdir first, a mounted volume's subfolder) is used without --overwrite
        assert main([*argv, str(out)]) == 0, capsys.readouterr().err
        previous = _names(out)
        assert main([*argv, str(out), "--overwrite"]) == 0 and _names(out) == previous  # a previous output: replaced
        # a folder with anything else in it is refused with the names, never emptied
        (out / "notes ü.txt").write_text("mine")
        (out / "other-model").mkdir()
        line = cli_error(capsys, main([*argv, str(out), "--overwrite"]))
        assert f"holds what {kind} folder does not (notes ü.txt, other-model/)" in line and "move them out" in line
        assert (out / "notes ü.txt").read_text() == "mine" and (out / "other-model").is_dir()
        # without --overwrite the same names come at once (offering --overwrite there only led to the refusal above)
        line = cli_error(capsys, main([*argv, str(out)]))
        assert f"already exists and holds what {kind} folder does not (notes ü.txt, other-model/)" in line, line
        assert "--overwrite" not in line
    # the current folder, or one above it, is never the output (it was moved away under the shell, or half-renamed)
    cwd = tmp_path / "cwd"
    (cwd / "sub").mkdir(parents=True)
    monkeypatch.chdir(cwd / "sub")
    for out in (".", ".."):
        assert "is the current folder (or holds it)" in cli_error(capsys, main([*merge, out, "--overwrite"]))
    assert _names(cwd / "sub") == [] and _names(cwd) == ["sub"]
    # the library function has the same rules
    from lorakit.export import write_folder

    with pytest.raises(LorakitError, match=r"holds what a model folder does not \(notes ü.txt, other-model/\)"):
        write_folder(torch.nn.Linear(2, 2), None, tmp_path / "merge out", torch.float32, overwrite=True)


def test_symlinked_output_is_written_where_it_points(tiny_folder, adapter, tmp_path, capsys):  # noqa: F811 (fixture)
    target = tmp_path / "big disk" / "merged"
    target.mkdir(parents=True)
    link = tmp_path / "merged"
    link.symlink_to(target)
    args = ["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--out", str(link), "--dtype", "fp32"]
    assert main(args) == 0 and main([*args, "--overwrite"]) == 0
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    assert _names(tmp_path / "big disk") == ["merged"]  # no temporary folder left beside it
    # an adapter folder reached through a link loads (the hub cache links files to blobs)
    (tmp_path / "linked-adapter").symlink_to(adapter)
    assert main(["inspect", str(tmp_path / "linked-adapter")]) == 0


def test_merged_files_are_readable_by_others(tiny_folder, adapter, tmp_path):  # noqa: F811 (fixture)
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--out", str(out)]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask, modes  # safetensors writes 0600: a server account could not read it
    assert set(modes.values()) == {0o666 & ~umask}


def test_failed_or_interrupted_merge_leaves_the_old_output(tiny_folder, adapter, tmp_path, capsys, monkeypatch):  # noqa: F811
    from transformers import PreTrainedModel

    out = tmp_path / "merged"
    args = ["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--out", str(out), "--overwrite"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_then(error):
        def save_pretrained(self, folder, *a, **k):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise error
        return save_pretrained

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_then(KeyboardInterrupt()))
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_then(OSError(errno.ENOSPC, "No space left on device")))
    line = cli_error(capsys, main(args))
    assert line.endswith(f"cannot write {out}: No space left on device; the existing folder is unchanged")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _names(tmp_path) == ["merged"]  # no half-written temporary folder beside it


def test_default_model_is_not_loaded_for_an_adapter_of_another_base(tiny_folder, adapter, tmp_path, capsys,  # noqa: F811
                                                                    monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the default model was loaded")

    other = tmp_path / "llama-adapter"
    shutil.copytree(adapter, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-3.2-1B"}))
    monkeypatch.setattr("lorakit.load_base", no_loading)
    for argv in (["merge", "--adapter", str(other), "--out", str(tmp_path / "m")], ["generate", "--adapter", str(other), "hi"],
                 ["combine", "--adapter", str(other), "--out", str(tmp_path / "c")]):
        line = cli_error(capsys, main(argv))
        assert (f"--adapter {other} was trained on 'meta-llama/Llama-3.2-1B' (base_model_name_or_path in its "
                "adapter_config.json), not on the default --model smollm2-135m; pass --model with a local folder of it "
                "(lorakit downloads nothing: hf download meta-llama/Llama-3.2-1B --local-dir DIR") in line, argv
    # a local base that exists is named as the --model to pass
    line = cli_error(capsys, main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m")]))
    assert line.endswith(f"pass --model {str(tiny_folder) if ' ' not in str(tiny_folder) else repr(str(tiny_folder))}")
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def test_adapter_files_as_editors_and_downloads_leave_them(adapter, tmp_path, capsys):
    raw = json.loads((adapter / "adapter_config.json").read_text())
    text = json.dumps(raw, indent=2)
    cases = {
        "utf16": (text.encode("utf-16"), "is UTF-16 text (Windows PowerShell's default for '>' and Out-File); save it as UTF-8"),
        "comment": (("// my run\n" + text).encode(), "(line 1 is a comment; JSON has no comments: delete it)"),
        "trailing": ((text[:-2] + ",\n}").encode(), "(a trailing comma before a closing bracket; JSON allows none: delete it)"),
        "empty": (b"", "is empty (an interrupted copy or download?); save or copy the adapter again"),
    }
    for name, (data, message) in cases.items():
        folder = tmp_path / name
        shutil.copytree(adapter, folder)
        (folder / "adapter_config.json").write_bytes(data)
        with pytest.raises(LorakitError, match=None) as caught:
            lorakit.read_adapter(folder)
        assert message in str(caught.value), name
        assert message in cli_error(capsys, main(["inspect", str(folder)]))
    bom = tmp_path / "bom"  # a UTF-8 BOM (Notepad) is read
    shutil.copytree(adapter, bom)
    (bom / "adapter_config.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert lorakit.read_adapter(bom).config.r == raw["r"]

    # a hub cache snapshot whose blob never finished downloading: a dangling link, said as such
    cache = tmp_path / "snapshot"
    cache.mkdir()
    (cache / "adapter_config.json").symlink_to(adapter / "adapter_config.json")
    (cache / "adapter_model.safetensors").symlink_to(tmp_path / "blobs" / "0123abc.incomplete")
    assert "adapter_model.safetensors is a symbolic link to" in cli_error(capsys, main(["inspect", str(cache)]))
    assert "which does not exist (an unfinished download?)" in cli_error(capsys, main(["inspect", str(cache)]))

    # a repository cloned without git-lfs: the weights file is a text pointer
    lfs = tmp_path / "lfs"
    shutil.copytree(adapter, lfs)
    (lfs / "adapter_model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                                   + "0" * 64 + "\nsize 17632\n")
    assert "is a Git LFS pointer (130 bytes), not the weights: run git lfs pull" in \
        cli_error(capsys, main(["inspect", str(lfs)]))

    # the adapter's own file where its folder goes: the folder is named
    line = cli_error(capsys, main(["inspect", str(adapter / "adapter_config.json")]))
    assert line.endswith(f"did you mean its folder {str(adapter)!r}?")


def test_pickled_file_beside_the_safetensors_is_never_opened(adapter, tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "both"
    shutil.copytree(adapter, folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    assert main(["inspect", str(folder)]) == 0
    assert lorakit.read_adapter(folder).config.r == 4 and not marker.exists()


def test_output_piped_into_head_ends_quietly(adapter, monkeypatch, capsys):
    import io

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["inspect", str(adapter)]) == 141
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "merge", "combine", "quantize", "inspect"])
def test_help_has_examples_and_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "example" in text and f"lorakit {command} " in text.split("example", 1)[1]
    if command in ("generate", "merge", "combine"):
        assert "(default: smollm2-135m)" in text
    if command in ("merge", "combine", "quantize"):
        assert "--overwrite" in text and "new or empty" in text


def test_gguf_export_into_a_path_with_spaces_and_unicode(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_hf_folder(tmp_path / "base model ü", hidden_size=64, intermediate_size=96)
    adapter_dir = make_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "ad ü", seed=1, std=0.05)
    out = tmp_path / "exports ü" / "my model"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter_dir), "--out", str(out),
                 "--format", "gguf", "--dtype", "fp32"]) == 0
    assert "my model-f16.gguf" in _names(out)
    import gguf

    reader = gguf.GGUFReader(str(out / "my model-f16.gguf"))
    assert len(reader.tensors) > 0
    assert _names(tmp_path / "exports ü") == ["my model"]


def test_run_and_checkpoint_folders_name_the_adapter_to_pass(adapter, tmp_path, capsys):
    run = tmp_path / "run"
    for step in ("step-000002", "step-000010"):  # lorakit train's checkpoints: step-N/adapter
        shutil.copytree(adapter, run / "checkpoints" / step / "adapter")
    line = cli_error(capsys, main(["inspect", str(run / "checkpoints")]))
    assert line.endswith(f"holds checkpoints (step-000002, step-000010); pass one's adapter folder, e.g. "
                         f"{run / 'checkpoints' / 'step-000010' / 'adapter'}")
    trainer = tmp_path / "hf"  # a Trainer output_dir: checkpoint-N folders hold the adapter files; the latest is named
    for step in ("checkpoint-20", "checkpoint-100"):
        shutil.copytree(adapter, trainer / step)
    line = cli_error(capsys, main(["inspect", str(trainer)]))
    assert line.endswith(f"holds adapters in subfolders (checkpoint-20, checkpoint-100); pass one of them, e.g. "
                         f"{trainer / 'checkpoint-100'}")


def test_unwritable_places_are_one_line(tiny_folder, adapter, tmp_path, capsys, monkeypatch):  # noqa: F811 (fixture)
    from lorakit.export import check_output_folder

    locked = tmp_path / "read-only"
    (locked / "merged").mkdir(parents=True)
    (locked / "merged" / "config.json").write_text("{}")
    real_access = os.access
    monkeypatch.setattr("lorakit.export.os.access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    for out in (locked / "new", locked / "merged"):  # a new folder in it, or replacing one inside it (made beside)
        line = cli_error(capsys, main(["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--out",
                                       str(out), "--overwrite"]))
        assert line.endswith(f"--out {out}: no permission to write in {locked}; choose another --out")
    (tmp_path / "old").mkdir()  # a read-only previous output: it cannot be renamed away
    (tmp_path / "old" / "config.json").write_text("{}")
    monkeypatch.setattr("lorakit.export.os.access", lambda path, mode: Path(path) not in (locked, tmp_path / "old"))
    line = cli_error(capsys, main(["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--out",
                                   str(tmp_path / "old"), "--overwrite"]))
    assert line.endswith(f"no permission to write in {tmp_path / 'old'}; choose another --out")
    # training writes into its folder, so its own checks keep accepting '.', a folder whose parent is read-only
    assert check_output_folder(locked / "merged", overwrite=True) == locked / "merged"
    monkeypatch.chdir(tmp_path)
    assert check_output_folder(".", overwrite=True) == Path(".")

    # combine: a save that fails halfway (a full disk) leaves the previous output and no temporary folder
    out = tmp_path / "combined"
    argv = ["combine", "--model", str(tiny_folder), "--adapter", f"{adapter}=0.5", "--out", str(out), "--overwrite"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(path, data):
        Path(path).write_bytes(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lorakit.io.atomic_write_bytes", full_disk)
    line = cli_error(capsys, main(argv))
    assert line.endswith(f"cannot save the adapter to {out}: No space left on device; choose a folder you can write")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_outputs_that_are_files_and_prompts_that_are_not_utf8(tiny_folder, adapter, tmp_path, capsys, monkeypatch):  # noqa: F811
    import io

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr("lorakit.load_base", no_loading)
    existing = tmp_path / "merged.safetensors"
    existing.write_bytes(b"mine")
    for argv in (["merge", "--adapter", str(adapter)], ["combine", "--adapter", str(adapter)], ["quantize"]):
        line = cli_error(capsys, main([*argv, "--model", str(tiny_folder), "--out", str(existing), "--overwrite"]))
        assert line.endswith(f"--out {existing} is a file; give a folder"), argv
    assert existing.read_bytes() == b"mine"

    # a Latin-1 file piped in: named as such (Python decoded it to lone surrogates the tokenizer refused obscurely)
    generate = ["generate", "--model", str(tiny_folder)]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    line = cli_error(capsys, main(generate))
    assert "standard input is not UTF-8 text (byte 0xe9 at offset 3); convert it first, e.g. iconv" in line
    assert "not UTF-8 text; pass it in UTF-8" in cli_error(capsys, main([*generate, "caf\udce9"]))
    # sampling options are named as the flags the user typed
    assert cli_error(capsys, main([*generate, "--top-p", "2", "hi"])).endswith("--top-p must be in (0, 1], got 2.0")
    assert "--max-new-tokens must be a positive integer" in \
        cli_error(capsys, main([*generate, "--max-new-tokens", "0", "hi"]))


def test_a_killed_runs_hidden_temporary_folder_is_named(tiny_folder, adapter, tmp_path, capsys):  # noqa: F811 (fixture)
    out = tmp_path / "merged"
    stale = tmp_path / ".merged.k2j3x9.tmp"  # what temp_dir leaves when the process is killed (out of memory)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 2**20)
    assert main(["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"note: {stale} beside --out is left from an earlier run that was stopped before it finished (1.0 MiB); " \
           "delete it to free the space" in err
    assert stale.is_dir()  # named, not deleted: another run may be writing it
    assert main(["combine", "--model", str(tiny_folder), "--adapter", str(adapter), "--out", str(tmp_path / "c")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_save_adapter_after_merge_and_unload_says_how_to_save(tmp_path):
    from conftest import tiny_llama

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    plain = lorakit.merge_and_unload(model)
    with pytest.raises(LorakitError, match=r"\(no adapters\). After merge_and_unload it is a plain model: save it whole "
                                           r"with model.save_pretrained\(folder\)"):
        lorakit.save_adapter(plain, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("shape, offsets", [([2**40, 2**40], [0, 16]), ([100_000, 100_000], [0, 40_000_000_000]),
                                            ([4, 4], [0, 64])])
def test_safetensors_header_claiming_huge_shapes_is_one_line(adapter, tmp_path, capsys, shape, offsets):
    """A header that claims terabytes (or more bytes than the file has) is refused without allocating them."""
    import struct

    folder = tmp_path / "huge"
    shutil.copytree(adapter, folder)
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                         {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    line = cli_error(capsys, main(["inspect", str(folder)]))
    assert f"{folder / 'adapter_model.safetensors'} is not a valid safetensors file" in line


def test_a_bind_mounted_out_that_cannot_be_renamed_is_one_line(tiny_folder, adapter, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A Docker bind mount is not seen by os.path.ismount (same device), and renaming it fails with EBUSY."""
    import lorakit._fs as fs

    out = tmp_path / "mounted"
    out.mkdir()
    real_replace = os.replace

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_replace(src, dst)

    monkeypatch.setattr(fs.os, "replace", busy)
    for argv in (["merge", "--adapter", str(adapter)], ["combine", "--adapter", str(adapter)], ["quantize"]):
        line = cli_error(capsys, main([*argv, "--model", str(tiny_folder), "--out", str(out)]))
        assert line.endswith(f"cannot write {out}: Device or resource busy ({out} is a mount point or in use: give a "
                             f"folder inside it, e.g. {out / 'out'}); the existing folder is unchanged"), line
        assert _names(out) == []


def test_default_model_stays_for_adapters_of_the_embedded_base():
    from types import SimpleNamespace

    from lorakit.commands._args import check_base_names

    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m", "/models/SmolLM2-135M", None):
        assert check_base_names(None, [("a", SimpleNamespace(base_name=name))]) == "smollm2-135m", name
    assert check_base_names("./mine", [("a", SimpleNamespace(base_name="meta-llama/Llama-3.2-1B"))]) == "./mine"
    with pytest.raises(LorakitError, match="trained on 'HuggingFaceTB/SmolLM2-360M'"):
        check_base_names(None, [("a", SimpleNamespace(base_name="HuggingFaceTB/SmolLM2-360M"))])


def test_a_path_the_system_refuses_is_one_line(tiny_folder, adapter, capsys):  # noqa: F811 (fixture)
    long = "a" * 300  # over the 255-byte limit of a file name: Path.exists() raises instead of saying False
    for argv in (["inspect", long], ["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--out", long],
                 ["generate", "--model", long, "hi"]):
        line = cli_error(capsys, main(argv))
        assert line.startswith(f"lorakit {argv[0]}: error: {'a' * 117}...: File name too long"), line


def test_a_model_cloned_without_git_lfs_is_named_before_loading(tiny_folder, tmp_path, capsys):  # noqa: F811 (fixture)
    clone = tmp_path / "clone"
    shutil.copytree(tiny_folder, clone)
    (clone / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 +
                                             "\nsize 66224\n")
    for argv in (["generate", "--model", str(clone), "hi"], ["quantize", "--model", str(clone), "--out", str(tmp_path / "q")]):
        line = cli_error(capsys, main(argv))  # it was safetensors' "header too large" traceback
        assert line.endswith(f"--model {clone}: model.safetensors is a Git LFS pointer, not the weights: run git lfs pull "
                             "in that repository, or download it with hf download REPO --local-dir DIR"), line
    data = (tiny_folder / "model.safetensors").read_bytes()
    for cut, expected in ((len(data) - 100, f"({len(data) - 100:,} bytes of {len(data):,}; an interrupted download or "
                                            "copy?): download or copy it again"), (0, "(0 bytes; an interrupted")):
        (clone / "model.safetensors").write_bytes(data[:cut])
        line = cli_error(capsys, main(["generate", "--model", str(clone), "hi"]))
        assert f"--model {clone}: model.safetensors is cut short or not a safetensors file {expected}" in line, line


def test_write_gguf_expands_tilde_and_refuses_a_folder(home):
    from conftest import tiny_llama
    from lorakit.export import write_gguf
    from test_serve_support import make_tokenizer

    tokenizer = make_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(LorakitError, match=r"is a folder; give the GGUF file's name, e.g. .*work/merged-f16.gguf"):
        write_gguf(model, tokenizer, home / "work", "f16")
    assert write_gguf(model, tokenizer, "~/m ü.gguf", "f16") == home / "m ü.gguf"
    assert (home / "m ü.gguf").stat().st_size > 0 and _names(home / "work") == []


def test_a_rank_pattern_key_that_is_no_regex_is_one_line(adapter, tmp_path, capsys):
    folder = tmp_path / "pattern"
    shutil.copytree(adapter, folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**raw, "rank_pattern": {"(q_proj": 2}}))
    line = cli_error(capsys, main(["inspect", str(folder)]))  # it was re.error's traceback while loading
    assert "rank_pattern key '(q_proj' is not a valid regular expression (missing ), unterminated subpattern" in line
