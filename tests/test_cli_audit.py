"""A new user's data files, model folders and output paths through the real CLI: each mistake is one line on stderr
(exit 2, no traceback, nothing half-written), and inputs other tools produce are read (regressions of a CLI audit)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import cli_error
from conftest import tiny_llama
from lorakit.cli import main
from lorakit.errors import LorakitError
from test_serve_support import make_adapter, make_tokenizer
from test_train_helpers import REPO, task_records, tiny_folder, write_jsonl  # noqa: F401 (fixture)

FAST = ["--rank", "2", "--batch-size", "2", "--no-progress", "--eval-examples", "0", "--max-steps", "1"]


def _save(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    (tokenizer or make_tokenizer()).save_pretrained(folder)
    return folder


# -- data files ---------------------------------------------------------------------------------------------------
def test_data_files_from_other_tools(tmp_path):
    """gzip, Parquet, a folder of files, pretty-printed .json, BOM + CRLF, quoted CSV newlines are read; a lone
    surrogate, a fake .gz, and an empty folder are refused by name."""
    from lorakit.train.formats import read_records

    pc = {"prompt": "Q: a, b\n", "completion": "A"}
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress((json.dumps(pc) + "\n").encode()))
    (tmp_path / "b.json").write_text(json.dumps({"text": "pretty"}, indent=2))
    (tmp_path / "c.csv").write_bytes('\ufeffprompt,completion\r\n"line1\r\nline2, x","say ""hi"""\r\n'.encode())
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p"], "completion": ["c"], "text": [None]}), tmp_path / "d.parquet")
    (tmp_path / "notes.md").write_text("not data")
    records = read_records(tmp_path)  # the folder: every data file in name order, other files ignored
    assert [dict(r.fields) for r in records] == [
        pc, {"text": "pretty"}, {"prompt": "line1\r\nline2, x", "completion": 'say "hi"'}, {"prompt": "p", "completion": "c"}]
    assert records[0].where == "a.jsonl.gz:1" and records[3].where == "d.parquet row 0"

    (tmp_path / "s.jsonl").write_text('{"text": "ok"}\n{"text": "cut \\ud83d"}\n')
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "x"}\n')
    (tmp_path / "empty").mkdir()
    for name, message in (("s.jsonl", r"s\.jsonl:2: field 'text' holds an unpaired surrogate"),
                          ("fake.jsonl.gz", "not gzip-compressed"),
                          ("empty", "a folder with no data files")):
        with pytest.raises(LorakitError, match=message):
            read_records(tmp_path / name)


def test_prompts_that_fill_max_length_are_counted_and_explained():
    """overflow=truncate on prompts longer than max_length leaves no target: the summary says why, and when nothing
    is left the error says the prompt is the problem (not 'use truncate', which the user already did)."""
    from lorakit.train.data import build_dataset

    tokenizer = make_tokenizer()
    long = {"prompt": "The quick brown fox jumps over the lazy dog. " * 4, "completion": "Paris"}
    dataset = build_dataset([long, long, {"text": "Hello there"}], tokenizer, 16, "truncate")
    assert (dataset.summary.dropped, dataset.summary.no_target, dataset.summary.too_long) == (2, 2, 0)
    assert "2 of 3 examples were dropped: 2 whose prompt fills max_length=16" in dataset.summary.drop_note()
    with pytest.raises(LorakitError, match="the prompt alone fills max_length=16 tokens"):
        build_dataset([long], tokenizer, 16, "truncate")
    assert "--overflow truncate" in build_dataset([long, {"text": "Hi"}], tokenizer, 16, "drop").summary.drop_note()


def test_config_file_names_from_other_tools_and_yaml_floats(tmp_path):
    from lorakit.train.config import TrainConfig, read_config_file

    (tmp_path / "a.yaml").write_text("lr: 1e-4\nrank: 8\n")  # PyYAML reads 1e-4 (no dot) as a string
    assert read_config_file(tmp_path / "a.yaml") == {"lr": 1e-4, "rank": 8}
    for text, message in (("learning_rate: 0.001\n", "unknown option 'learning_rate'; did you mean 'lr'"),
                          ("lora_r: 8\n", "did you mean 'rank'"),
                          ("resume: true\n", "'resume' is a command-line flag only"),
                          ("pack: 'yes'\n", r"option 'pack' has the wrong type: 'yes' \(expected true or false\)")):
        (tmp_path / "b.yaml").write_text(text)
        with pytest.raises(LorakitError, match=message):
            read_config_file(tmp_path / "b.yaml")
    with pytest.raises(LorakitError, match="--alpha must be a finite number"):  # 0 is a warned no-op, as in peft
        TrainConfig(alpha=float("inf"))
    with pytest.raises(LorakitError, match="--max-steps must be a positive integer, got -1"):
        TrainConfig(max_steps=-1)
    assert TrainConfig(targets=["all-linear"]).lora_config().target_modules == "all-linear"


# -- model folders ------------------------------------------------------------------------------------------------
def test_model_folders_nobody_tested(tmp_path):
    """Each broken folder is refused with what to do; Gemma 2 (no sdpa) loads with eager attention."""
    import transformers as tf

    import lorakit

    good = _save(tiny_llama(vocab_size=len(make_tokenizer())), tmp_path / "good")
    cases = {}
    for name, edit in (("t5", {"model_type": "t5", "is_encoder_decoder": True}), ("vit", {"model_type": "vit"}),
                       ("future", {"model_type": "llama9000"})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(edit))
        cases[name] = folder
    cases["no-tokenizer"] = tmp_path / "no-tokenizer"
    cases["no-tokenizer"].mkdir()
    for f in ("config.json", "model.safetensors"):
        (cases["no-tokenizer"] / f).write_bytes((good / f).read_bytes())
    from safetensors.torch import load_file, save_file

    cases["partial"] = _save(tiny_llama(vocab_size=len(make_tokenizer())), tmp_path / "partial")
    weights = load_file(cases["partial"] / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1." not in k}, cases["partial"] / "model.safetensors")
    expected = {"t5": "'t5' is an encoder-decoder model; lorakit fine-tunes decoder-only causal LMs",
                "vit": "'vit' is not a causal language model", "future": "model_type 'llama9000' is unknown to transformers",
                "no-tokenizer": "has no tokenizer", "partial": r"the safetensors weights lack 9 of the model's tensors"}
    for name, message in expected.items():
        with pytest.raises(LorakitError, match=message):
            lorakit.load_base(str(cases[name]), device="cpu")

    tokenizer = make_tokenizer()
    config = tf.Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    _save(tf.Gemma2ForCausalLM(config), tmp_path / "gemma2", tokenizer)
    model, _ = lorakit.load_base(str(tmp_path / "gemma2"), device="cpu")
    assert model.config._attn_implementation == "eager"


def test_generate_on_a_model_that_flattens_rows(tmp_path, capsys):
    """OPT reshapes (B, T, H) to (B*T, H) in its MLP: one adapter, and several side by side, still generate."""
    import transformers as tf

    tokenizer = make_tokenizer()
    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                           num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64))
    folder = _save(model, tmp_path / "opt", tokenizer)
    first = make_adapter(model, tmp_path / "one", seed=1)
    second = make_adapter(model, tmp_path / "two", seed=2)
    code = main(["generate", "--model", str(folder), "--adapter", str(first), "--max-new-tokens", "3", "Hello"])
    alone = capsys.readouterr().out
    assert code == 0 and alone
    code = main(["generate", "--model", str(folder), "--adapter", str(first), "--adapter", str(second), "--base",
                 "--max-new-tokens", "3", "Hello"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("=== ") == 3
    assert out.split("=== one")[1].split("\n", 1)[1].split("===")[0].strip() == alone.strip()


def test_a_short_context_model_trains_and_generates_within_it(tmp_path, capsys):
    """GPT-2's learned positions fail with an index error past n_positions: the default max_length is lowered to
    it (and said), a larger explicit one is refused, and generation stops at the context."""
    import transformers as tf

    tokenizer = make_tokenizer()
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=24))
    folder = _save(gpt2, tmp_path / "gpt2", tokenizer)
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 4}] * 4)
    code = main(["train", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--overflow", "truncate", *FAST])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "max_length lowered from 256 to 24" in out and "4 truncated at max_length=24" in out
    code = main(["train", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run2"),
                 "--max-length", "64", *FAST])
    assert "--max-length 64 is longer than the model's context of 24 tokens" in cli_error(capsys, code)
    assert not (tmp_path / "run2").exists()
    code = main(["generate", "--model", str(folder), "--no-chat", "--max-new-tokens", "50", "Hello"])
    captured = capsys.readouterr()
    assert code == 0 and "--max-new-tokens lowered to" in captured.err


# -- output folders and flags -------------------------------------------------------------------------------------
def test_outputs_that_cannot_be_written_or_would_destroy_an_input(tmp_path, tiny_folder, capsys):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(tiny_folder), tmp_path / "adapter", seed=3)
    data = write_jsonl(tmp_path / "train.jsonl", task_records(8))
    merge = ["merge", "--model", str(tiny_folder), "--adapter", str(adapter), "--overwrite", "--out"]
    for out, message in ((tmp_path, "is, holds or sits inside the adapter folder"),
                         (adapter / "merged", "is, holds or sits inside the adapter folder"),
                         (tiny_folder, "is, holds or sits inside the model folder"),
                         (data / "merged", "is a file, not a folder")):
        assert message in cli_error(capsys, main([*merge, str(out)]))
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    train = ["train", "--model", str(tiny_folder), "--data", str(data), *FAST, "--out"]
    assert "is a file, not a folder" in cli_error(capsys, main([*train, str(data / "run")]))
    code = main(["eval", "--model", str(tiny_folder), "--data", str(data), "--json", str(data / "x.json")])
    assert "--json" in cli_error(capsys, code)

    # unknown names among several are named with this model's layers (a typo was skipped silently)
    for flag in (["--targets", "q_proj", "v_prj"], ["--exclude", "q_prj"], ["--modules-to-save", "lm_hed"]):
        line = cli_error(capsys, main([*train, str(tmp_path / "typo"), *flag]))
        assert f"{flag[0]} '{flag[-1]}' matches no module" in line and "did you mean" in line and "q_proj" in line
    assert not (tmp_path / "typo").exists()

    # a failed fresh run leaves no folder behind (the same command can run again), an --overwrite run leaves
    # none of the old run's files, and a failed --overwrite run leaves the old run as it was
    code = main([*train, str(tmp_path / "run"), "--max-length", "2"])
    assert cli_error(capsys, code) and not (tmp_path / "run").exists()
    # 2 steps: FAST's "--max-steps 1" replaced in place (a second --max-steps is refused, not the last one kept)
    two_steps = [word if i != train.index("--max-steps") + 1 else "2" for i, word in enumerate(train)]
    assert main([*two_steps, str(tmp_path / "run"), "--save-every", "1"]) == 0
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main([*train, str(tmp_path / "run"), "--overwrite"]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000001"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1 and (run / "notes.txt").read_text() == "mine"
    cli_error(capsys, main([*train, str(run), "--overwrite", "--max-length", "2"]))
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_inspect_and_demo_on_folders_that_are_not_what_they_expect(tmp_path, tiny_folder, capsys):
    import shutil

    assert "is a model folder (config.json), not an adapter" in cli_error(capsys, main(["inspect", str(tiny_folder)]))
    assert "is a file; give the adapter folder" in \
        cli_error(capsys, main(["inspect", str(tiny_folder / "config.json")]))
    base = tmp_path / "base"  # a base model: its tokenizer has no chat template
    shutil.copytree(tiny_folder, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["demo", "--model", str(base), "--rank", "2"]) == 0
    assert "continuation (no chat template)" in capsys.readouterr().out


def test_ctrl_c_leaves_a_valid_checkpoint_and_says_how_to_resume(tmp_path, tiny_folder):
    from lorakit.train.checkpoint import find_checkpoint, read_state

    data = write_jsonl(tmp_path / "train.jsonl", task_records(16))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "train", "--model", str(tiny_folder), "--data",
                                str(data), "--out", str(run), "--rank", "2", "--batch-size", "2", "--no-progress",
                                "--eval-examples", "0", "--max-steps", "100000", "--save-every", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # Ctrl-C's default action in the run: a shell that started the test suite in the
                               # background without job control left SIGINT ignored, which children inherit (and
                               # Python then installs no KeyboardInterrupt handler): the run never stopped
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240  # generous: on 2 busy CI cores the interpreter-mode kernels start slowly
    while not (run / "checkpoints" / "latest").is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    started = (run / "checkpoints" / "latest").is_file()
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say what the run was doing, for the next reader of a CI log
        process.kill()
        _, err = process.communicate()
        raise AssertionError(f"no exit 120 s after Ctrl-C (checkpoint written before it: {started}); stderr:\n"
                             f"{err[-3000:]}") from None
    assert started, err
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert f"continue with: lorakit train --resume {run}" in err
    checkpoint = find_checkpoint(run)
    assert read_state(checkpoint)["step"] >= 2 and f"the last checkpoint is {checkpoint}" in err
