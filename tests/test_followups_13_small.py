"""Small follow-ups of the thirteenth audits: eval's --progress / --no-progress, one layout line for an FSDP run,
no missing-glyph warnings from a run report's plot, the wrong-base message naming the base once, wrongly typed
generation_config.json values warned of, and eval's run-folder data message naming the folder the run started in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import tiny_llama
from lorakit.cli import main
from test_newuser_audit_12_cli import _refused
from test_serve_support import make_adapter
from test_train_helpers import make_model_folder, task_records, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder, a second one of other shapes, training data, and an adapter made on the first."""
    root = tmp_path_factory.mktemp("small13")
    tiny = make_model_folder(root / "tiny")
    other = root / "other"  # hidden 48 instead of 32: no adapter of `tiny` fits it
    tiny_llama(vocab_size=32, hidden_size=48, intermediate_size=40, num_hidden_layers=2).save_pretrained(other)
    shutil.copy(tiny / "tokenizer.json", other)
    shutil.copy(tiny / "tokenizer_config.json", other)
    adapter = make_adapter(tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2),
                           root / "adapter", seed=1)
    return {"root": root, "tiny": tiny, "other": other, "adapter": adapter,
            "data": write_jsonl(root / "train.jsonl", task_records(8, seed=1))}


# -- the wrong base -------------------------------------------------------------------------------------------------
def test_the_wrong_base_message_names_the_adapters_base_once(files, capsys, tmp_path):
    """'... (adapter_config.json names the base X); pass --model X, the base its adapter_config.json names' said
    the same thing twice in one line."""
    named = shutil.copytree(files["adapter"], tmp_path / "named")
    config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(files["tiny"])}))
    line = _refused(capsys, ["generate", "--model", files["other"], "--adapter", named, "Hello"])
    assert line.count("adapter_config.json names") == 1, line
    assert line.endswith(f"adapter_config.json names the base {str(files['tiny'])!r}); pass --model {files['tiny']}"), line


# -- eval of a run's adapter from another folder ----------------------------------------------------------------------
def test_eval_names_the_folder_a_runs_data_is_found_from(tmp_path, monkeypatch):
    """config.yaml keeps a run's data paths as typed where it started; eval from elsewhere said only 'the run started
    elsewhere?', while a resume names the folder above the run that the paths are found from."""
    from lorakit.errors import LorakitError
    from lorakit.train.eval_cli import run_validation_data

    project = tmp_path / "project"
    run = project / "runs" / "mine"
    (run / "adapter").mkdir(parents=True)
    (project / "data").mkdir()
    write_jsonl(project / "data" / "val.jsonl", task_records(4, seed=2))
    (run / "config.yaml").write_text("model: m\nout: runs/mine\nrank: 4\nlr: 0.001\ndata: [train.jsonl]\n"
                                     "val_data: [data/val.jsonl]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(LorakitError) as caught:
        run_validation_data(str(run / "adapter"))
    assert str(caught.value) == (f"the adapter's run read --val-data data/val.jsonl ({run / 'config.yaml'}), which is "
                                 f"not found from this folder ({elsewhere}); the run's paths are as typed where it "
                                 f"started: they are found from {project}: cd there, or give the records to score "
                                 "with --data")
    monkeypatch.chdir(project)  # from there the run's own validation records are scored
    files, records, _ = run_validation_data(str(run / "adapter"))
    assert files == ["data/val.jsonl"] and len(records) == 4


# -- generation_config.json of wrongly typed values -------------------------------------------------------------------
def test_wrongly_typed_generation_config_values_are_warned_of_and_left_out(files, capsys, tmp_path):
    """eos_token_id "3" and temperature "hot" were taken silently (the stop id lost without a word), and
    max_new_tokens -1 or "12" stopped the load ('`max_new_tokens` must be greater than 0' / a TypeError) although
    the weights are fine: each is one warning line naming the field, its value and what is used instead."""
    import warnings

    from lorakit.models import load_base

    folder = shutil.copytree(files["tiny"], tmp_path / "model")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": "3", "temperature": "hot", "max_new_tokens": -1, "top_k": 20}))
    with warnings.catch_warnings(record=True) as caught:  # the CLI prints each as one 'warning: ...' line
        warnings.simplefilter("always")
        code = main(["generate", "--model", str(folder), "--max-new-tokens", "2", "Hello"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    path = folder / "generation_config.json"
    warned = [str(w.message) for w in caught if "generation_config.json" in str(w.message)]
    assert warned == [
        f"{path}: eos_token_id '3' is not a token id (an integer or a list of them), so it is ignored: "
        "generation stops on the tokenizer's eos and the chat template's end of turn",
        f"{path}: temperature 'hot' is not a number, so it is ignored (transformers' default is used)",
        f"{path}: max_new_tokens -1 is not an integer of at least 1, so it is ignored (transformers' "
        "default is used)"], [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model, _ = load_base(str(folder), device="cpu")
    config = model.generation_config  # the valid values are kept, the wrong ones left out
    assert (config.bos_token_id, config.top_k, config.temperature, config.max_new_tokens) == (1, 20, None, None)
    assert config.eos_token_id in (None, 2)  # transformers may take config.json's eos; never the string "3"


# -- the loss curve of a model whose path is not in the plot's font ------------------------------------------------
def test_a_loss_curve_titled_with_cjk_draws_without_glyph_warnings(tmp_path):
    """A run on a model folder named in Chinese printed matplotlib's 'Glyph 27169 (\\N{CJK UNIFIED IDEOGRAPH-6A21})
    missing from font(s) DejaVu Sans' for every character, in the middle of the run's output. The title is drawn
    with the characters the font has (the others as '?'), and kept whole in the PNG's Title text."""
    import warnings

    from PIL import Image

    from lorakit.train.report import plot_loss_curve

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 3.0 - s / 10}) + "\n" for s in range(1, 6))
                       + json.dumps({"kind": "val", "step": 5, "val_loss": 2.7}) + "\n")
    title = "lora on /data/模型/tiny-模型"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (a missing glyph above all) fails here
        png = plot_loss_curve(metrics, tmp_path / "loss.png", title=title)
    image = Image.open(png)
    assert image.size == (700, 400)
    assert image.text.get("Title") == title  # the whole path, for a reader of the file


# -- lorakit eval --progress / --no-progress --------------------------------------------------------------------------
def test_eval_has_progress_and_no_progress_as_train_does(files, capsys):
    """train had --progress / --no-progress; eval had neither: a bar on a terminal and nothing at all in a log (a long
    eval into a file said nothing until it ended). Now: --progress draws the bar anywhere, --no-progress (and, by
    default, a stream that is not a terminal: capsys here) prints a plain line now and then."""
    import re

    eval_ = ["eval", "--model", str(files["tiny"]), "--data", str(files["data"]), "--batch-size", "4",
             "--max-new-tokens", "2", "--samples", "0"]
    # loss counts batches; generating counts decode steps, 2 in each of its 2 batches (test_followups_16_progress)
    line = re.compile(r"^(loss|generating): (\d+)/(\d+) (?:batches|steps)(?:, \d+/\d+ records done)?, "
                      r"\d+:\d\d:\d\d elapsed, \d+:\d\d:\d\d left$", re.M)
    for flags in ([], ["--no-progress"]):
        code = main(eval_ + flags)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "\r" not in captured.err, captured.err  # no bar redraws in a log
        assert [m.group(1, 2, 3) for m in line.finditer(captured.err)] == [
            ("loss", "1", "2"), ("loss", "2", "2"), *(("generating", str(n), "4") for n in range(1, 5))], captured.err
        assert "exact match" in captured.out
    code = main(eval_ + ["--progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "\r" in captured.err and "loss" in captured.err and "generating" in captured.err, captured.err
    assert not line.search(captured.err), captured.err


# -- an FSDP run's layout: one line ------------------------------------------------------------------------------------
FSDP_SCRIPT = '''
import os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import torch.distributed as dist
from conftest import tiny_llama
from test_train_helpers import task_records, tiny_tokenizer
from lorakit.train.config import TrainConfig
from lorakit.train.data import build_dataset
from lorakit.train.loop import train
dist.init_process_group("gloo")
tok = tiny_tokenizer()
model = tiny_llama(seed=0, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2)
train(model, tok, build_dataset(task_records(8, seed=3), tok, max_length=32),
      TrainConfig(rank=4, max_steps=1, progress=False, save_every=0, eval_examples=0, batch_size=2, fsdp=True))
import gc
gc.collect()
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''


def test_an_fsdp_run_says_its_layout_in_one_line(tmp_path):
    """Under torchrun with --fsdp, rank 0 said 'FSDP2 over 2 processes: global batch ...' and then 'FSDP2: 4 sharded
    units over 2 processes': the same layout in two lines. Two real gloo processes."""
    import os
    import subprocess
    import sys

    from test_train_helpers import REPO

    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT.format(tests=tests))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    layout = [line for line in done.stderr.splitlines() if "FSDP2" in line]
    # 4 units: the 2 layers, the decoder, the untied head
    assert layout == ["FSDP2 over 2 processes, 4 sharded units: global batch 4 rows per optimizer step (--batch-size "
                      "2 x 1 accumulation x 2 processes)"], layout


def test_the_nf4_load_reads_generation_config_json_through_the_same_check(files, tmp_path):
    """load_base(quantize="nf4") builds the model from config.json (lorakit's layer-by-layer NF4 loader), which read
    no generation_config.json at all: its stop ids (a list, as Llama 3's) and sampling values were lost, and its
    wrongly typed values never warned of. Now both loads give the model the same generation config."""
    import warnings

    from lorakit.models import load_base

    folder = shutil.copytree(files["tiny"], tmp_path / "model")
    path = folder / "generation_config.json"
    path.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7], "top_k": 20, "temperature": 0.6}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_base(str(folder), device="cpu", quantize="nf4")
    assert any(type(m).__name__ == "NF4Linear" for m in model.modules())  # the NF4 path, not the dense one
    config = model.generation_config
    assert (config.eos_token_id, config.top_k, config.temperature) == ([2, 7], 20, 0.6)
    assert not [w for w in caught if "generation_config.json" in str(w.message)]

    path.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": "3", "max_new_tokens": -1, "top_k": 20}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_base(str(folder), device="cpu", quantize="nf4")
    warned = [str(w.message) for w in caught if "generation_config.json" in str(w.message)]
    assert warned == [  # the dense load's words (test above), once each
        f"{path}: eos_token_id '3' is not a token id (an integer or a list of them), so it is ignored: "
        "generation stops on the tokenizer's eos and the chat template's end of turn",
        f"{path}: max_new_tokens -1 is not an integer of at least 1, so it is ignored (transformers' "
        "default is used)"], [str(w.message) for w in caught]
    config = model.generation_config
    assert (config.bos_token_id, config.top_k, config.max_new_tokens) == (1, 20, None)
    assert config.eos_token_id != "3"
