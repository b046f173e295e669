"""Paths as users have them (session 24, helper "paths"): ``~`` where no shell expands it, Windows backslashes in a
config file, symlinks in a served adapters folder.

``out: ~/runs/x`` in a config file (or ``--out=~/x``, ``TrainConfig(out="~/x")``) wrote the run into a folder named
``~`` under the current one and left its ``adapter/`` empty: the adapter was saved through the expanded path into a
hidden temporary folder. ``--resume=~/runs/x`` said the run does not exist.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorakit.cli import main
from cli_helpers import cli_error
from test_train_helpers import task_records, tiny_folder, write_jsonl  # noqa: F401 (fixture)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fake home folder and a current folder elsewhere, so a literal '~' folder would show up in the latter."""
    home = tmp_path / "home é"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


def test_a_tilde_out_in_a_config_file_is_the_home_folder(tiny_folder, home, capsys):  # noqa: F811 (fixture)
    write_jsonl(home / "train 中文.jsonl", task_records(8, seed=1))
    config = home / "run.yaml"
    config.write_text(f"model: {tiny_folder}\ndata: ['~/train 中文.jsonl']\nout: ~/runs/x\nrank: 2\nmax_steps: 1\n"
                      "batch_size: 4\nval_fraction: 0\neval_examples: 0\n", encoding="utf-8")
    assert main(["train", "--config", str(config), "--no-progress"]) == 0
    run = home / "runs" / "x"
    # the adapter is whole where the line says, and nothing went to a folder named '~' under the current one
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (Path.cwd() / "~").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    captured = capsys.readouterr()
    assert f"adapter: {run / 'adapter'}" in captured.out + captured.err
    # --resume=~/runs/x (the shell expands no ~ after '='): it continues that run
    assert main(["train", "--resume=~/runs/x", "--max-steps", "2", "--no-progress"]) == 0
    assert (run / "checkpoints" / "step-000002").is_dir()
    assert not (Path.cwd() / "~").exists()


def test_train_from_python_expands_a_tilde_out(tiny_folder, home):  # noqa: F811 (fixture)
    import lorakit
    from lorakit.train import TrainConfig, train

    model, tokenizer = lorakit.load_base(str(tiny_folder))
    result = train(model, tokenizer, task_records(8, seed=1),
                   config=TrainConfig(max_steps=1, rank=2, batch_size=4, out="~/nb", eval_examples=0))
    assert Path(result.adapter_dir) == home / "nb" / "adapter"
    assert (home / "nb" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (Path.cwd() / "~").exists()


def test_windows_backslashes_name_the_path_meant(tiny_folder, tmp_path, monkeypatch, capsys):  # noqa: F811 (fixture)
    """A config file written on Windows (model: ..\\models\\tiny): on Linux a backslash is part of a file name, so
    the model was "neither an embedded model nor a local folder ... download it first", and the data or adapter
    path just "not found"; each now names the path with '/'."""
    import shutil

    import lorakit
    from lorakit.errors import LorakitError
    from lorakit.train.sources import read_records

    (tmp_path / "models").mkdir()
    shutil.copytree(tiny_folder, tmp_path / "models" / "tiny")
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", task_records(4))
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(LorakitError, match=r"model folder \.\.\\models\\tiny does not exist; did you mean "
                                           r"\.\./models/tiny\? \(a '\\' is part of a file name here"):
        lorakit.load_base("..\\models\\tiny")
    with pytest.raises(LorakitError, match=r"did you mean \.\./data/train\.jsonl\?"):
        read_records("..\\data\\train.jsonl")
    model, _ = lorakit.load_base("../models/tiny")
    from test_serve_support import make_adapter

    make_adapter(model, tmp_path / "runs" / "mine" / "adapter", seed=1)
    with pytest.raises(LorakitError, match=r"adapter folder \.\.\\runs\\mine\\adapter does not exist; did you mean "
                                           r"\.\./runs/mine/adapter\?"):
        lorakit.load_adapter(model, "..\\runs\\mine\\adapter")
    # the command line says the same in one line, and a backslash path that exists in no form is still "check the path"
    line = cli_error(capsys, main(["inspect", "..\\runs\\mine\\adapter"]))
    assert "did you mean ../runs/mine/adapter?" in line
    with pytest.raises(LorakitError, match=r"model folder \.\.\\nothing does not exist; check the path"):
        lorakit.load_base("..\\nothing")


def test_serve_names_broken_links_in_the_adapters_folder(tmp_path):
    """README: start-up names any folder it skips and why. A link to a run since deleted (adapters/orders ->
    ../runs/old/adapter) or a loop of links was left out of /v1/models without a word."""
    from lorakit.serve.cli import skipped_folders

    root = tmp_path / "adapters é"
    root.mkdir()
    (root / "orders").symlink_to(tmp_path / "runs" / "old" / "adapter")
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    skipped = dict(skipped_folders(root))
    assert skipped["orders"] == f"it is a link to {tmp_path / 'runs' / 'old' / 'adapter'}, which does not exist"
    assert skipped["a"] == f"it is a link to {root / 'b'}, a loop of links"
    assert set(skipped) == {"orders", "a", "b"}


def test_a_symlinked_model_folder_is_not_another_base(tiny_folder, tmp_path):  # noqa: F811 (fixture)
    """An adapter trained on models/current (a link to the real folder) and loaded on the real folder's path was
    warned about as 'names the base .../current, this model is .../tiny-model0 ... gives wrong outputs'."""
    import warnings

    import lorakit
    from test_serve_support import make_adapter

    link = tmp_path / "current"
    link.symlink_to(tiny_folder, target_is_directory=True)
    model, _ = lorakit.load_base(str(link))
    folder = make_adapter(model, tmp_path / "adapter", seed=1)
    assert lorakit.io.read_adapter(folder).base_name == str(link)
    model, _ = lorakit.load_base(str(tiny_folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(model, folder)
    assert not [w for w in caught if "names the base" in str(w.message)]


def test_serve_names_the_base_by_its_folder_given_as_a_relative_path(tmp_path, monkeypatch):
    """--model . (run inside the model folder) served the base as "." in /v1/models, and --model .. as ".."."""
    from lorakit.serve.cli import default_base_name

    folder = tmp_path / "models" / "llama é"
    folder.mkdir(parents=True)
    monkeypatch.chdir(folder)
    assert default_base_name(".") == default_base_name("./") == default_base_name(str(folder) + "/") == "llama é"
    assert default_base_name("..") == "models"
    assert default_base_name("smollm2-135m") == "smollm2-135m" and default_base_name("org/name") == "name"
    monkeypatch.setenv("HOME", str(tmp_path / "models"))
    assert default_base_name("~/llama é/") == "llama é"


def test_links_that_lead_nowhere_are_named(tiny_folder, tmp_path, capsys):  # noqa: F811 (fixture)
    """A symlink loop given as --out was a traceback (RuntimeError: Symlink loop), a dangling link 'cannot write:
    Not a directory' (merge) or 'File exists' (train), and a dangling --model 'neither an embedded model ... download
    it first'."""
    import lorakit
    from lorakit.errors import LorakitError
    from test_serve_support import make_adapter

    model, _ = lorakit.load_base(str(tiny_folder))
    adapter = make_adapter(model, tmp_path / "adapter", seed=1)
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for out, why in (("gone", f"a link to {tmp_path / 'nowhere'}, which does not exist"),
                     ("loop1", f"a link to {tmp_path / 'loop2'}, a loop of links")):
        line = cli_error(capsys, main(["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--out",
                                       str(tmp_path / out)]))
        assert line.endswith(f"--out {tmp_path / out} is {why}; remove the link or give another --out"), line
    assert os.path.islink(tmp_path / "gone") and not (tmp_path / "nowhere").exists()
    with pytest.raises(LorakitError, match=r"model folder .*gone is a link to .*nowhere, which does not exist$"):
        lorakit.load_base(str(tmp_path / "gone"))
    with pytest.raises(LorakitError, match=r"adapter folder .*loop1 is a link to .*loop2, a loop of links$"):
        lorakit.load_adapter(model, tmp_path / "loop1")
