"""`lorakit train` over combinations of options, as a demanding user mixes them.

Each combination either trains (finite loss, the adapter changes the logits, the saved adapter reloads with
``lorakit.load_adapter`` and with ``peft.PeftModel.from_pretrained`` to the trained model's logits, and
``lorakit merge`` of it gives them too), or is refused in one line before the model is loaded. A resume with a
changed optimizer flag applies it (the checkpoint's saved learning rate used to win without a word).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from test_train_helpers import make_model_folder, task_records, write_jsonl

from lorakit.cli import main

IDS = torch.tensor([[1, 7, 10, 11, 12, 9, 3, 5, 2, 4]])
QUIET = ["--eval-examples", "0", "--samples", "0", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    return {"model": make_model_folder(root / "model"),
            "train": write_jsonl(root / "train.jsonl", task_records(24, seed=1)),
            "val": write_jsonl(root / "val.jsonl", task_records(6, seed=2)),
            "root": root}


@pytest.fixture
def captured(monkeypatch):
    """The model as training left it (the runner's call to the loop, wrapped)."""
    import lorakit.train.runner as runner

    seen = {}
    original = runner.train

    def spy(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        seen["model"] = model
        return result

    monkeypatch.setattr(runner, "train", spy)
    return seen


def _train(files, out, *flags):
    lora = [] if "--full" in flags else ["--rank", "4", "--lr", "1e-2"]
    steps = [] if "--epochs" in flags or "--max-steps" in flags else ["--max-steps", "2"]
    batch = [] if "--batch-size" in flags else ["--batch-size", "4"]  # the CLI refuses a flag given twice
    return main(["train", "--model", str(files["model"]), "--data", str(files["train"]), "--out", str(out),
                 *batch, *steps, *QUIET, *lora, *flags])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _fresh_base(files, trained=None):
    """The base from its folder; with ``trained`` (an NF4 run), its weights replaced by the dequantized NF4 ones."""
    from transformers import AutoModelForCausalLM

    from lorakit import quant

    base = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    if trained is not None:
        dense = {name.replace(".base_layer", ""): quant.dense_weight(module).float()
                 for name, module in trained.named_modules() if quant.is_quantized(module)}
        assert dense, "the --quantize nf4 run has no quantized layer"
        with torch.no_grad():
            for name, module in base.named_modules():
                if name in dense:
                    module.weight.copy_(dense[name])
    return base


TRAINS = {
    "lora+dropout+constant+long-warmup": ["--dropout", "0.1", "--schedule", "constant", "--seed", "5",
                                          "--warmup-steps", "5"],
    "rslora+loraplus+checkpointing": ["--variant", "rslora", "--loraplus-ratio", "16", "--gradient-checkpointing"],
    "dora+head+regex-targets": ["--variant", "dora", "--modules-to-save", "lm_head", "--targets", r".*\.(q|v)_proj"],
    "rsdora+nf4+checkpointing+pack": ["--variant", "rsdora", "--quantize", "nf4", "--gradient-checkpointing", "--pack",
                                      "--batch-size", "1", "--loraplus-ratio", "16", "--dropout", "0.1"],
    "dora+embed+gaussian+loraplus": ["--variant", "dora", "--modules-to-save", "embed_tokens", "--init", "gaussian",
                                     "--loraplus-ratio", "16", "--weight-decay", "0.1"],
    "pissa+rslora+val+fraction-epochs": ["--init", "pissa", "--variant", "rslora", "--val-fraction", "0.25",
                                         "--eval-every", "1", "--epochs", "0.4"],
    "nf4+subset+float16": ["--quantize", "nf4", "--targets", "q_proj", "v_proj", "--dtype", "float16"],
}


@pytest.mark.parametrize("flags", TRAINS.values(), ids=TRAINS.keys())
def test_combination_trains_and_reloads_everywhere(flags, files, captured, tmp_path, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    import lorakit

    code = _train(files, tmp_path / "run", *flags)
    captured_err = capsys.readouterr().err
    assert code == 0, captured_err
    if "--warmup-steps" in flags:  # longer than the 2-step run: clamped, and now said
        assert "--warmup-steps 5 is longer than the run (2 steps)" in captured_err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train_loss"] is not None and math.isfinite(results["train_loss"])
    trained = captured["model"]
    memory = _logits(trained)
    adapter = tmp_path / "run" / "adapter"
    quantized = "--quantize" in flags
    half = "--dtype" in flags  # the run computed in float16: a float32 reload agrees to float16 rounding
    atol = 2e-3 if half else 1e-5

    base = _fresh_base(files, trained if quantized else None)
    untouched = _logits(base)
    twin = copy.deepcopy(base)
    lorakit.load_adapter(base, adapter)
    reloaded = _logits(base)
    assert (reloaded - untouched).abs().max() > 1e-3, "training left the adapter at its initial no-op"
    torch.testing.assert_close(reloaded, memory, atol=atol, rtol=0)
    via_peft = _logits(peft.PeftModel.from_pretrained(twin, str(adapter)).eval())
    torch.testing.assert_close(via_peft, memory, atol=atol, rtol=0)

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(files["model"]), "--adapter", str(adapter), "--out", str(merged_dir),
                 "--dtype", "float32"]) == 0
    merged = _logits(AutoModelForCausalLM.from_pretrained(merged_dir).eval())
    if quantized:  # merged into the original float32 base, not the NF4 one it was trained on: close, not equal
        torch.testing.assert_close(merged, memory, atol=0.1, rtol=0)
        assert (merged - _logits(_fresh_base(files))).abs().max() > 1e-3
    else:
        torch.testing.assert_close(merged, memory, atol=atol, rtol=0)


def test_full_fine_tuning_with_checkpointing_and_pack_saves_the_trained_model(files, captured, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    code = _train(files, tmp_path / "run", "--full", "--gradient-checkpointing", "--pack", "--batch-size", "1",
                  "--dtype", "bfloat16")
    assert code == 0, capsys.readouterr().err
    trained = captured["model"]
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.bfloat16).eval()
    torch.testing.assert_close(_logits(saved), _logits(trained), atol=0, rtol=0)
    assert (_logits(saved) - _logits(_fresh_base(files))).abs().max() > 1e-3


REFUSED = {
    # --full with float16 weights: AdamW's eps and squared gradients underflow, every weight became NaN after one
    # step and the run still ended "done" with exit 0
    "full+float16": (["--full", "--dtype", "float16"], ["--full", "--dtype float16", "bfloat16"]),
    # adapters stay float32 on a float16 base, but the whole-module copy was float16: NaN lm_head, exit 0
    "float16+modules-to-save": (["--dtype", "float16", "--modules-to-save", "lm_head"],
                                ["--modules-to-save lm_head", "--dtype float16", "bfloat16"]),
    # --modules-to-save under --full was ignored without a word (everything is trained and saved anyway)
    "full+modules-to-save": (["--full", "--modules-to-save", "lm_head"], ["--full", "--modules-to-save"]),
    # PiSSA on an NF4 base failed only after loading (and quantizing) the model
    "nf4+pissa": (["--quantize", "nf4", "--init", "pissa"], ["--init pissa", "--quantize nf4"]),
    # a module in both lists: 'matched no module' (naming the module among the model's names), or the LoRA on it
    # dropped silently when other targets matched
    "targets+modules-to-save": (["--targets", "q_proj", "lm_head", "--modules-to-save", "lm_head"],
                                ["lm_head", "--targets", "--modules-to-save"]),
    "targets+modules-to-save-only": (["--targets", "embed_tokens", "--modules-to-save", "embed_tokens"],
                                     ["embed_tokens", "--targets", "--modules-to-save"]),
    # no validation set: these were ignored without a word
    "early-stopping-without-validation": (["--early-stopping-patience", "2"], ["--early-stopping-patience",
                                                                              "--val-fraction"]),
    "eval-every-without-validation": (["--eval-every", "1"], ["--eval-every", "--val-data"]),
    # these three failed after loading with 'matched no module' while naming the module, or never stopped early
    "targets+exclude": (["--targets", "q_proj", "v_proj", "--exclude", "q_proj"], ["q_proj", "--targets", "--exclude"]),
    "all-linear+names": (["--targets", "all-linear", "lm_head"], ["all-linear", "lm_head", "regular expression"]),
    "early-stopping+eval-every-0": (["--val-fraction", "0.2", "--early-stopping-patience", "1", "--eval-every", "0"],
                                    ["--early-stopping-patience", "--eval-every 0"]),
    # --compile-layers compiles the fused path: with it off the flag did nothing, without a word
    "compile-layers+no-fast-kernels": (["--compile-layers", "--no-fast-kernels"], ["--compile-layers", "--no-fast-kernels"]),
    "compile-layers+fsdp": (["--compile-layers", "--fsdp"], ["--compile-layers", "--fsdp"]),
    "full+lora-options": (["--full", "--variant", "dora", "--loraplus-ratio", "16"], ["--variant", "--loraplus-ratio"]),
}


@pytest.mark.parametrize("flags, words", REFUSED.values(), ids=REFUSED.keys())
def test_conflicting_flags_are_refused_in_one_line_before_loading(flags, words, files, tmp_path, capsys, monkeypatch):
    import lorakit.train.runner as runner

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the conflict was refused")

    monkeypatch.setattr(runner, "load_model", no_loading)
    code = _train(files, tmp_path / "run", *flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lorakit train: error: "), err
    for word in words:
        assert word in err[0], err[0]
    assert not (tmp_path / "run").exists()


def test_rank_and_alpha_patterns_from_a_config_file(files, tmp_path, capsys, monkeypatch):
    """A pattern key is a regular expression: a bad one is refused before loading, one matching no adapted module
    (a typo that kept the default rank without a word) before training; a good one shapes the saved adapter."""

    def run(text, *flags):
        (tmp_path / "run.yaml").write_text(text)
        return main(["train", "--config", str(tmp_path / "run.yaml"), "--model", str(files["model"]), "--data",
                     str(files["train"]), "--out", str(tmp_path / "run"), "--batch-size", "4", "--max-steps", "1",
                     *QUIET, *flags])

    assert run("rank_pattern: {'q_proj(': 2}\n") == 2
    assert "rank_pattern key 'q_proj(' is not a valid regular expression" in capsys.readouterr().err
    assert run("rank_pattern: {'q_porj': 2}\n") == 2
    assert "rank_pattern key 'q_porj' matches none of the adapted modules" in capsys.readouterr().err
    assert run("alpha_pattern: {'q_proj': 4}\n", "--targets", "v_proj") == 2
    assert "alpha_pattern key 'q_proj' matches none" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert run("rank_pattern: {'layers\\.0\\.self_attn\\.q_proj': 2}\nvariant: dora\nrank: 4\n", "--variant",
               "rslora") == 0
    capsys.readouterr()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0] == 2
    assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"][0] == 4
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config.get("use_dora") is False  # the flag overrode the file


def _group_lrs(checkpoint):
    tree = json.loads((checkpoint / "optimizer.json").read_text())
    return {group["name"]: group["initial_lr"] for group in tree["param_groups"]}


def test_resume_with_a_changed_optimizer_flag_applies_it_and_says_so(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(files, out, "--save-every", "1") == 0
    first = _group_lrs(out / "checkpoints" / "step-000002")
    assert set(first.values()) == {1e-2}
    capsys.readouterr()
    code = main(["train", "--resume", "--out", str(out), "--max-steps", "4", "--lr", "3e-3", "--loraplus-ratio", "4",
                 "--weight-decay", "0.1", *QUIET])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "optimizer settings changed since the checkpoint, applied from step 3" in err
    assert "lr of group A: 0.01 then, 0.003 now" in err and "lr of group B: 0.01 then, 0.012 now" in err
    # before the fix the checkpoint's groups (lr 1e-2, no LoRA+, no decay) were loaded and kept to the end
    after = _group_lrs(out / "checkpoints" / "step-000004")
    assert after["A"] == pytest.approx(3e-3) and after["B"] == pytest.approx(12e-3)
    tree = json.loads((out / "checkpoints" / "step-000004" / "optimizer.json").read_text())
    assert {g["name"]: g["weight_decay"] for g in tree["param_groups"]}["A"] == 0.1


def test_a_refused_resume_leaves_the_run_resumable(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(files, out, "--save-every", "1") == 0
    saved_config = (out / "config.yaml").read_text()
    capsys.readouterr()
    code = main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--variant", "dora", *QUIET])
    err = capsys.readouterr().err.strip().splitlines()
    # refused from the run's config.yaml before the model loads (it was after loading, and the message showed the
    # first 16 characters of two JSON dumps: '{"alora_invocati then, {"alora_invocati now')
    assert code == 2 and len(err) == 1 and err[0].startswith("lorakit train: error: cannot resume")
    assert "another --variant (variant: 'lora' then, 'dora' now)" in err[0]
    # the base's precision is part of what the checkpoints were trained against
    for flag in (["--quantize", "nf4"], ["--dtype", "float16"]):
        assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", *flag, *QUIET]) == 2
        assert f"another {flag[0]} ({flag[0][2:]}: None then, " in capsys.readouterr().err
    # config.yaml used to keep the refused variant, so the plain --resume after it was refused the same way
    assert (out / "config.yaml").read_text() == saved_config
    # a --max-steps below the checkpoint's step was "nothing to do", and results.json lost the run's loss
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "1", *QUIET]) == 2
    assert "is at step 2, past this run's end at step 1" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == saved_config
    loss = json.loads((out / "results.json").read_text())["train_loss"]
    assert main(["train", "--resume", "--out", str(out), *QUIET]) == 0  # the same end: nothing left to do
    assert json.loads((out / "results.json").read_text())["train_loss"] == loss
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", *QUIET]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 3


def test_a_lora_config_reused_for_full_fine_tuning_needs_its_own_lr(files, tmp_path, capsys):
    """A run's config.yaml lists its effective lr (2e-3 for LoRA); reused with --full it trained every weight at
    40x the full fine-tuning default without a word."""
    (tmp_path / "lora.yaml").write_text(f"model: {files['model']}\ndata: [{files['train']}]\nfull: false\nlr: 0.002\n")
    code = main(["train", "--config", str(tmp_path / "lora.yaml"), "--full", "--out", str(tmp_path / "run"), *QUIET])
    assert code == 2
    assert "lr 0.002 was set for LoRA" in capsys.readouterr().err


def test_seed_and_checkpointing_with_dropout_give_the_same_adapter(files, tmp_path, capsys):
    """Same seed: the same adapter, with or without --gradient-checkpointing (its recompute replays the dropout
    masks); another seed: another adapter."""
    from safetensors.torch import load_file

    def adapter(name, *flags):
        assert _train(files, tmp_path / name, "--dropout", "0.3", *flags) == 0, capsys.readouterr().err
        return load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))

    plain, checkpointed, other = adapter("a"), adapter("b", "--gradient-checkpointing"), adapter("c", "--seed", "1")
    assert all(torch.equal(plain[k], checkpointed[k]) for k in plain)
    assert any(not torch.equal(plain[k], other[k]) for k in plain)


def test_train_refuses_float16_trainable_tensors_from_the_python_api():
    """The CLI refuses --dtype float16 with --full or --modules-to-save; a Python caller passing a float16 model
    gets the same answer from train() before any step (it used to train to NaN weights and return normally)."""
    from conftest import tiny_llama
    from test_train_helpers import tiny_tokenizer

    from lorakit.errors import LorakitError
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    model = tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40).half()
    with pytest.raises(LorakitError, match="trainable tensors are float16"):
        train(model, tiny_tokenizer(), task_records(8), TrainConfig(full=True, max_steps=1, batch_size=2, progress=False))


def test_overwrite_never_replaces_folders_of_a_folder_that_is_not_a_run(files, tmp_path, capsys):
    """--overwrite cleared lorakit's names (adapter/, model/, checkpoints/, config.yaml...) in any --out: a user's
    own model/ or adapter/ beside their notes was deleted. Only a run folder's are replaced now."""
    mine = tmp_path / "project"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "weights.safetensors").write_text("precious")
    (mine / "notes.txt").write_text("mine")
    code = _train(files, mine, "--overwrite")
    assert code == 2 and "--overwrite would replace model/ in" in capsys.readouterr().err
    assert (mine / "model" / "weights.safetensors").read_text() == "precious"
    run = tmp_path / "run"
    assert _train(files, run, "--max-steps", "1") == 0
    (run / "notes.txt").write_text("mine")
    assert _train(files, run, "--overwrite") == 0  # an earlier run is replaced, other files stay
    assert json.loads((run / "results.json").read_text())["steps"] == 2 and (run / "notes.txt").read_text() == "mine"


def test_a_checkpoint_refused_for_other_adapter_settings_names_them():
    """The identity check after loading (the Python API, or a run folder without its config.yaml) names the PEFT
    settings that differ rather than two 16-character prefixes of their JSON."""
    from pathlib import Path

    from lorakit.errors import LorakitError
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import check_identity

    def adapter(**changes):
        return json.dumps(TrainConfig(rank=4, **changes).lora_config().to_peft_dict(), sort_keys=True)

    with pytest.raises(LorakitError, match=r"use_dora: False then, True now\)") as error:
        check_identity({"adapter": adapter()}, {"adapter": adapter(variant="dora")}, Path("ckpt"))
    assert "alora" not in str(error.value)
