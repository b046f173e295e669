"""A new user's QLoRA (NF4) and many-process workflows on a CPU-only machine (audit 13).

Each test is a failure found by running the README's "QLoRA: a 4-bit base" and "Many GPUs" commands, and the
Trainer / TRL integrations, on tiny random models; it failed before its fix.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lorakit
from conftest import tiny_llama
from test_train_helpers import SMALL, make_model_folder, task_records, write_jsonl

# -- gradient checkpointing without transformers' deprecation warning -------------------------------------------


def _no_future_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    deprecations = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)
                    and "checkpointing" in str(w.message)]
    assert not deprecations, deprecations
    return result


def test_checkpointing_an_injected_model_warns_nothing_and_still_checkpoints():
    """transformers 5.2x renamed ``gradient_checkpointing_enable`` (the old name warns, FutureWarning). lorakit's
    wrapper of the old name made the new one route through it, so every ``lorakit train --gradient-checkpointing``,
    Trainer ``gradient_checkpointing=True`` and TRL SFT run printed "`gradient_checkpointing_enable` is deprecated"."""
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    _no_future_warnings(enable)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    # reentrant checkpointing still gets the embeddings' output to require grad (else its layers' adapters get none)
    model.train()
    model.gradient_checkpointing_disable()
    kwargs_name = ("activation_checkpointing_kwargs" if hasattr(model, "activation_checkpointing_enable")
                   else "gradient_checkpointing_kwargs")
    _no_future_warnings(lambda: enable(**{kwargs_name: {"use_reentrant": True}}))
    ids = torch.randint(0, 128, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # A gets none while B is 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_lorakit_train_with_gradient_checkpointing_warns_nothing(tmp_path):
    from lorakit.train import TrainConfig, train
    from test_train_helpers import tiny_tokenizer, tiny_train_model

    model = tiny_train_model()
    config = TrainConfig(**SMALL, max_steps=1, gradient_checkpointing=True)
    result = _no_future_warnings(lambda: train(model, tiny_tokenizer(), task_records(8), config=config))
    assert result.train_loss > 0


# -- torchrun --fsdp on a 4-bit base: refused before the model loads, naming what to change --------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny 16-bit model folder and its 4-bit (bitsandbytes NF4) folder, as `lorakit quantize` writes it."""
    from lorakit.models.quantized_saving import save_quantized
    from test_train_helpers import tiny_tokenizer

    root = tmp_path_factory.mktemp("audit13")
    dense = make_model_folder(root / "dense")
    model, tokenizer = lorakit.load_base(str(dense), quantize="nf4", device="cpu")
    save_quantized(model, tiny_tokenizer(), root / "nf4")
    return dense, root / "nf4"


@pytest.mark.parametrize("quantized_folder", [True, False])
def test_fsdp_on_an_nf4_base_is_refused_before_loading(folders, monkeypatch, quantized_folder):
    """`torchrun ... --fsdp` with a 4-bit base loaded the whole base first (minutes for a 70B) and then said "drop
    --quantize" even when the user had given none (the folder itself is 4-bit)."""
    from lorakit.errors import LorakitError
    from lorakit.train import TrainConfig
    from lorakit.train.preflight import check_before_loading

    dense, nf4 = folders
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = TrainConfig(model=str(nf4), fsdp=True) if quantized_folder else TrainConfig(model=str(dense), fsdp=True,
                                                                                          quantize="nf4")
    monkeypatch.setattr("lorakit.train.preflight.empty_model", lambda folder: pytest.fail("got past the NF4 check"))
    with pytest.raises(LorakitError) as refused:
        check_before_loading(config, {"targets"})
    message = str(refused.value)
    assert "\n" not in message and "--fsdp" in message and "data parallel" in message
    if quantized_folder:
        assert "--quantize" not in message and "4-bit folder" in message and str(nf4) in message
    else:
        assert "--quantize nf4" in message
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: --fsdp shards nothing, the NF4 base trains as it is
    check_before_loading(config.replace(targets=None), set())


# -- resuming a torchrun run on another number of processes ---------------------------------------------------


def test_resume_on_another_process_count_is_refused_before_loading_with_the_command(tmp_path, monkeypatch, capsys):
    """A run trained under `torchrun --nproc_per_node 2` resumed as `lorakit train --resume RUN` loaded the model,
    printed its trainable parameters, then refused with "(torchrun --nproc_per_node) (processes: 2 then, 1 now)"
    without the command that does resume it. The checkpoint here is a one-process run's, its identity edited to what
    a two-process run writes (`processes: 2`): the refusal reads only that field."""
    from lorakit.cli import main

    folder = make_model_folder(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", task_records(16))
    run = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--data", str(data), "--out", str(run), "--max-steps", "2",
                 "--save-every", "1", "--batch-size", "4", "--rank", "4", "--eval-examples", "0",
                 "--no-progress"]) == 0
    state_path = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "state.json"
    state = json.loads(state_path.read_text())
    state["identity"]["processes"] = 2
    state_path.write_text(json.dumps(state))
    capsys.readouterr()
    monkeypatch.setattr("lorakit.train.runner.load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["train", "--resume", str(run), "--max-steps", "3", "--no-progress"]) != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 processes" in error and f"torchrun --nproc_per_node 2 -m lorakit train --resume {run}" in error, error


# -- Ctrl-C of a torchrun run: the hint resumes it on the same number of processes, said once --------------------


def test_interrupted_torchrun_run_is_told_the_torchrun_command_once(tmp_path, monkeypatch, capsys):
    """Ctrl-C of `torchrun --nproc_per_node 2 -m lorakit train ...` printed "continue with: lorakit train --resume
    RUN" (a one-process command, which is refused for a two-process run) and "lorakit train: interrupted" once per
    process."""
    from lorakit.cli import main
    from lorakit.train import runner
    from lorakit.train.checkpoint import LATEST

    checkpoint = tmp_path / "run" / "checkpoints" / "step-000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    (checkpoint.parent / LATEST).write_text(checkpoint.name)
    monkeypatch.setattr("lorakit.train.distributed.world", lambda: (0, 2))
    hint = runner.interrupted_hint(tmp_path / "run")
    assert f"continue with: torchrun --nproc_per_node 2 -m lorakit train --resume {tmp_path / 'run'}" in hint
    monkeypatch.setattr("lorakit.train.distributed.world", lambda: (0, 1))
    assert f"continue with: lorakit train --resume {tmp_path / 'run'}" in runner.interrupted_hint(tmp_path / "run")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lorakit.train.runner.run_training", stopped)
    for rank, said in (("1", ""), ("0", "lorakit train: interrupted")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun sets both (RANK alone is not a torchrun job: lorakit._rank)
        assert main(["train", "--out", str(tmp_path / "other"), "--max-steps", "1"]) == 130
        assert capsys.readouterr().err.strip() == said


# -- training on a folder `lorakit quantize` wrote says it is QLoRA, as --quantize nf4 does ----------------------


def test_training_on_a_4bit_folder_says_it_is_qlora(folders, tmp_path, capsys):
    """`lorakit train --model ./x-nf4` (the README's "save it once, then train with --model ./x-nf4") printed
    "lora of ./x-nf4 on cpu", as for a 16-bit base; `--quantize nf4` on the 16-bit folder printed "(NF4 4-bit base:
    QLoRA)"."""
    from lorakit.cli import main

    dense, nf4 = folders
    data = write_jsonl(tmp_path / "train.jsonl", task_records(8))
    assert main(["train", "--model", str(nf4), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--batch-size", "4", "--rank", "4", "--eval-examples", "0", "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"lorakit train: lora of {nf4} (NF4 4-bit base: QLoRA, a 4-bit folder) on cpu"), first


# -- lorakit quantize of a float32 (or float16) base says what precision the rest of the model is kept in ---------


def test_quantize_says_when_the_dense_weights_change_precision(folders, tmp_path, capsys):
    """`lorakit quantize` of a float32 base wrote its embeddings, norms and head in bfloat16 (the --dtype default)
    without a word: the 4-bit folder then trains against another base than `--quantize nf4` on the same folder (the
    logits differed by 2e-2 on a tiny Llama)."""
    from safetensors import safe_open

    from lorakit.cli import main

    dense, _ = folders
    assert main(["quantize", "--model", str(dense), "--out", str(tmp_path / "bf16")]) == 0
    printed = capsys.readouterr().out
    assert "float32" in printed and "bfloat16" in printed and "--dtype fp32" in printed, printed
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # what the note says
    assert main(["quantize", "--model", str(dense), "--out", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert "--dtype" not in capsys.readouterr().out  # asked for: nothing to say


# -- an adapter trained on lorakit's NF4 base, loaded by peft on bitsandbytes' 4-bit base of the same model --------


def test_nf4_adapter_in_peft_on_a_bitsandbytes_base_gives_the_same_logits(tmp_path, no_dynamo):
    """The README's promise both ways: lorakit's NF4 is bitsandbytes' NF4, so an adapter made on one is the same
    model on the other (down_proj's 104 inputs: rows that are not a multiple of the 64-value block). bitsandbytes runs
    in training mode here: its CPU inference path (avx512-bf16 machines) repacks the weights and computes in
    bfloat16. Not tested: a width of 96 (hidden_size=96), where bitsandbytes 0.50.2's native CPU dequantize gives
    other values than its own quantize_4bit codes mean (its generic path and lorakit agree; GPUs use that one)."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    shape = dict(seed=2, hidden_size=64, intermediate_size=104)
    tiny_llama(**shape).save_pretrained(tmp_path / "base")
    ours = tiny_llama(**shape)
    lorakit.quantize(ours, "nf4")
    lorakit.inject(ours, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)  # a trained adapter's B is not zero
    lorakit.save_adapter(ours, tmp_path / "adapter")

    bnb = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, quantization_config=(
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)))
    theirs = peft.PeftModel.from_pretrained(bnb, tmp_path / "adapter").train()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        with theirs.disable_adapter():
            assert (theirs(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapter mattered


# -- --full and --init pissa on a 4-bit base: refused before it loads, in the user's terms -----------------------


@pytest.mark.parametrize("option", [dict(full=True), dict(init="pissa")])
def test_full_and_pissa_on_a_4bit_folder_are_refused_before_loading(folders, monkeypatch, option):
    """Both loaded the base first, then said "load it without quantize" / "quantize after training" to a user who
    had given no --quantize (the folder was 4-bit; with --quantize, TrainConfig refuses them at once)."""
    from lorakit.errors import LorakitError
    from lorakit.train import TrainConfig
    from lorakit.train.preflight import check_before_loading

    _, nf4 = folders
    monkeypatch.setattr("lorakit.train.preflight.empty_model", lambda folder: pytest.fail("got past the 4-bit check"))
    with pytest.raises(LorakitError) as refused:
        check_before_loading(TrainConfig(model=str(nf4), targets=["q_proj"], **option), {"targets"})
    message = str(refused.value)
    assert "\n" not in message and ("--full" in message if "full" in option else "--init pissa" in message)
    assert "--quantize" not in message and "4-bit folder" in message and "16-bit original" in message
    with pytest.raises(LorakitError, match="quantized"):  # the --quantize spelling: refused as it was
        TrainConfig(model=str(nf4), quantize="nf4", **option)
