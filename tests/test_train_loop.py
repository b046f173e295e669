"""The training loop: token-weighted accumulation, bad steps, checkpoints (atomic, failing writes), resume checks,
early stopping, full fine-tuning and the report files."""

from __future__ import annotations

import errno
import json

import pytest
import torch
import torch.nn.functional as F

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.errors import LorakitError
from lorakit.train import checkpoint as ckpt
from lorakit.train import loop
from lorakit.train.config import TrainConfig
from lorakit.train.data import IGNORE_INDEX, Collator, DataSummary, SupervisedDataset, build_dataset
from lorakit.train.loop import accumulate_gradients, train
from test_train_helpers import SMALL, task_records, tiny_tokenizer
from test_train_helpers import lora_state as _lora_state, tiny_train_model as _model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def dataset(tok):
    return build_dataset(task_records(32, seed=3), tok, max_length=32)


# -- accumulation ---------------------------------------------------------------------------------------------------
def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulated_gradient_equals_the_full_batch_gradient(dataset, tok):
    """Micro-batches of 2 x 4 and of 8 x 1 give the gradient of the mean token loss over all 8 examples."""
    from lorakit import LoraConfig, inject

    collate = Collator(tok.pad_token_id)
    rows = [dataset[i] for i in range(8)]
    supervised = [sum(l != IGNORE_INDEX for l in r["labels"][1:]) for r in rows]
    assert len(set(supervised)) > 2  # examples differ in supervised length, so weighting matters

    def run(micro_size):
        torch.manual_seed(0)
        model = inject(_model(), LoraConfig(r=4, alpha=8, init="gaussian"))
        with torch.no_grad():  # B != 0 so that every adapter tensor gets a gradient
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.1)
        micro = [collate(rows[i:i + micro_size]) for i in range(0, 8, micro_size)]
        total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        loss_sum = accumulate_gradients(model, micro, total, torch.device("cpu"))
        return model, loss_sum / total, _grads(model)

    model, full_loss, full = run(8)
    _, loss_2, accumulated = run(2)
    _, loss_1, single = run(1)
    # the reference: the mean token loss of the whole padded batch, computed directly
    batch = collate(rows)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                ignore_index=IGNORE_INDEX)
    reference.backward()
    value = float(reference.detach())
    assert loss_2 == pytest.approx(value, rel=1e-5) and loss_1 == pytest.approx(value, rel=1e-5)
    for name, grad in _grads(model).items():
        assert_close(full[name], grad)
        assert_close(accumulated[name], grad)
        assert_close(single[name], grad)
    # the naive mean of per-micro-batch means is a different (wrong) gradient: the test can tell them apart
    model.zero_grad()
    for i in range(8):
        one = collate(rows[i:i + 1])
        out = model(input_ids=one["input_ids"]).logits
        (F.cross_entropy(out[0, :-1], one["labels"][0, 1:], ignore_index=IGNORE_INDEX) / 8).backward()
    naive = _grads(model)
    assert any(not torch.allclose(naive[n], g, rtol=1e-3, atol=1e-6) for n, g in full.items())


def test_train_with_accumulation_matches_one_big_batch(dataset, tok):
    """Three optimizer steps with batch 8 x accum 1 and batch 2 x accum 4 end with the same adapter."""
    results = []
    for batch_size, accum in ((8, 1), (2, 4)):
        model = _model()
        config = TrainConfig(**{**SMALL, "batch_size": batch_size, "grad_accum": accum, "max_steps": 3})
        train(model, tok, dataset, config)
        results.append(_lora_state(model))
    assert set(results[0]) == set(results[1])
    for name in results[0]:
        assert_close(results[1][name], results[0][name])
    assert any(float(results[0][n].abs().max()) > 0 for n in results[0] if n.endswith("lora_B"))


# -- bad steps ------------------------------------------------------------------------------------------------------
def _poison(model, steps_to_poison: set[int]):
    """Make the output of the first decoder layer NaN on the given (1-based) forward calls."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] in steps_to_poison:
            return (output[0] * float("nan"),) + tuple(output[1:]) if isinstance(output, tuple) else output * float("nan")
        return output

    model.model.layers[0].register_forward_hook(hook)


def test_a_nan_step_is_skipped_and_counted(dataset, tok, tmp_path):
    model = _model()
    _poison(model, {2})
    states = []
    result = train(model, tok, dataset, TrainConfig(**{**SMALL, "max_steps": 4}), out=tmp_path,
                   on_step=lambda step, entry: states.append((entry, _lora_state(model))))
    assert result.skipped_steps == 1 and result.steps == 4
    entry, after = states[1]
    assert entry["skipped"] == "non-finite loss" and "loss" not in entry
    assert all(torch.equal(after[n], states[0][1][n]) for n in after)  # the skipped step changed nothing
    assert all(torch.isfinite(p).all() for p in after.values())
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l.get("skipped") for l in lines if l["kind"] == "train"] == [None, "non-finite loss", None, None]


def test_the_run_stops_after_too_many_bad_steps(dataset, tok):
    model = _model()
    _poison(model, set(range(1, 100)))
    with pytest.raises(LorakitError, match=r"3 steps in a row had a NaN or infinite loss.*lower --lr"):
        train(model, tok, dataset, TrainConfig(**{**SMALL, "max_steps": 10, "max_bad_steps": 3}))


def test_a_batch_without_supervised_tokens_is_skipped(dataset, tok, capsys):
    rows = [dict(dataset[i]) for i in range(4)]
    rows[1] = {"input_ids": rows[1]["input_ids"], "labels": [IGNORE_INDEX] * len(rows[1]["labels"])}
    data = SupervisedDataset(rows, dataset.records[:4], DataSummary())
    model = _model()
    result = train(model, tok, data, TrainConfig(**{**SMALL, "batch_size": 1, "max_steps": 4, "seed": 5}))
    assert result.skipped_steps == 1
    assert "no supervised token" in capsys.readouterr().err


# -- checkpoints -----------------------------------------------------------------------------------------------------
def test_nested_state_round_trips_through_safetensors_and_json():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1], "name": None}]}
    tensors: dict = {}
    tree = json.loads(json.dumps(ckpt.flatten_state(state, "opt", tensors)))
    back = ckpt.unflatten_state(tree, tensors)
    assert back["param_groups"] == state["param_groups"]
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"]) and 0 in back["state"]
    rng_tensors, scalars = ckpt.rng_state()
    assert all(t.dtype == torch.uint8 for t in rng_tensors.values())
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    ckpt.set_rng_state(rng_tensors, json.loads(json.dumps(scalars)))
    again = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(dataset, tok, tmp_path, monkeypatch):
    real = ckpt._write_safetensors
    calls = {"n": 0}

    def failing(path, tensors):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint writes 3 safetensors files; the second fails
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors)

    monkeypatch.setattr(ckpt, "_write_safetensors", failing)
    model = _model()
    with pytest.raises(LorakitError) as caught:
        train(model, tok, dataset, TrainConfig(**{**SMALL, "max_steps": 6, "save_every": 2}), out=tmp_path)
    message = str(caught.value)
    assert "No space left on device" in message and "step-000002 is still valid" in message and "\n" not in message
    folder = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(folder).name == "step-000002"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step-000002"]  # no half-written folder left
    monkeypatch.setattr(ckpt, "_write_safetensors", real)
    from lorakit.optim import build_optimizer

    state = ckpt.load_checkpoint(folder / "step-000002", model, build_optimizer(model, lr=1e-3))
    assert state["step"] == 2 and state["data"]["index"] == 8


def test_resume_refuses_other_data_or_batch_settings(dataset, tok, tmp_path):
    train(_model(), tok, dataset, TrainConfig(**{**SMALL, "max_steps": 2}), out=tmp_path)
    with pytest.raises(LorakitError, match=r"another --batch-size \(batch_size: 4 then, 2 now\)"):
        train(_model(), tok, dataset, TrainConfig(**{**SMALL, "max_steps": 4, "batch_size": 2}), resume=tmp_path)
    other = build_dataset(task_records(32, seed=4), tok, max_length=32)
    with pytest.raises(LorakitError, match="other training data"):
        train(_model(), tok, other, TrainConfig(**{**SMALL, "max_steps": 4}), resume=tmp_path)
    with pytest.raises(LorakitError, match="another base model"):
        train(tiny_llama(seed=0, vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2), tok,
              dataset, TrainConfig(**{**SMALL, "max_steps": 4}), resume=tmp_path)
    with pytest.raises(LorakitError, match="no checkpoint"):
        train(_model(), tok, dataset, TrainConfig(**SMALL), resume=tmp_path / "metrics.jsonl")


def test_in_process_resume_is_bit_identical(dataset, tok, tmp_path):
    """Stop after step 3 (checkpoint every 2), resume from step 2: same adapter as the uninterrupted run."""
    config = TrainConfig(**{**SMALL, "max_steps": 5, "save_every": 2, "dropout": 0.2})
    straight = _model()
    train(straight, tok, dataset, config)

    class Stop(Exception):
        pass

    def stop_at_3(step, entry):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(_model(), tok, dataset, config, out=tmp_path, on_step=stop_at_3)
    torch.manual_seed(123)  # the resume must not depend on the caller's random state
    resumed = _model()
    result = train(resumed, tok, dataset, config, out=tmp_path, resume=tmp_path)
    assert result.steps == 5
    a, b = _lora_state(straight), _lora_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


# -- during training -----------------------------------------------------------------------------------------------
def test_best_adapter_and_early_stopping(dataset, tok, tmp_path, monkeypatch):
    losses = iter([2.0, 1.5, 1.7, 1.6, 1.55])
    monkeypatch.setattr(loop, "dataset_loss", lambda *a, **k: (next(losses), 10))
    config = TrainConfig(**{**SMALL, "max_steps": 10, "eval_every": 1, "early_stopping_patience": 3})
    result = train(_model(), tok, dataset, config, val_data=dataset, out=tmp_path)
    assert result.stopped == "early_stopping" and result.steps == 5
    assert result.best_step == 2 and result.best_val_loss == 1.5
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()
    vals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    assert [v["best"] for v in vals] == [True, True, False, False, False]


def test_report_files_and_function_api(dataset, tok, tmp_path):
    model = _model()
    result = train(model, tok, dataset, TrainConfig(**{**SMALL, "max_steps": 8, "lr": 2e-2, "save_every": 4}),
                   val_data=dataset, out=tmp_path)
    assert result.val_losses and result.val_losses[-1][1] < result.val_losses[0][1] + 1e-9
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if l["kind"] == "train"]
    assert [l["step"] for l in train_lines] == list(range(1, 9))
    assert all(l["tokens_per_s"] > 0 and l["lr"] > 0 for l in train_lines)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000004", "step-000008"]
    from lorakit import load_adapter

    fresh = _model()
    load_adapter(fresh, tmp_path / "adapter")
    ids = torch.randint(0, 32, (1, 9))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_full_fine_tuning_saves_a_loadable_model(dataset, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model()
    before = model.lm_head.weight.detach().clone()
    train(model, tok, dataset, TrainConfig(**{**SMALL, "full": True, "max_steps": 2, "lr": 1e-3}), out=tmp_path)
    assert not torch.equal(before, model.lm_head.weight)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert (tmp_path / "model" / "tokenizer.json").is_file()


@pytest.mark.parametrize("wrap_head", [False, True])
def test_supervised_positions_head_equals_full_logits_loss(dataset, tok, wrap_head):
    """loss_sum runs the output head only where a label is supervised: same loss and gradients as full logits."""
    from lorakit import LoraConfig, inject
    from lorakit.train.evaluate import loss_sum

    torch.manual_seed(0)
    model = inject(_model(), LoraConfig(r=4, init="gaussian", modules_to_save=["lm_head"] if wrap_head else None))
    batch = Collator(tok.pad_token_id)([dataset[i] for i in range(5)])
    fast = loss_sum(model, batch)
    fast.backward()
    fast_grads = _grads(model)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 32), batch["labels"][:, 1:].reshape(-1), reduction="sum")
    full.backward()
    assert_close(fast.detach(), full.detach())
    for name, grad in _grads(model).items():
        assert_close(fast_grads[name], grad)
    assert wrap_head == any("lm_head" in n for n in fast_grads)


def test_activation_offload_gives_the_same_gradients():
    """--offload-activations moves saved tensors to CPU memory and back: the gradients must not change."""
    from lorakit.train.loop import accumulate_gradients

    grads = []
    for offload in (False, True):
        model = tiny_llama()
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for name, p in lorakit.lora_parameters(model):
                if name.endswith("lora_B"):
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        accumulate_gradients(model, [batch], int(ids.numel()), torch.device("cpu"), offload_activations=offload)
        grads.append([p.grad.clone() for _, p in lorakit.lora_parameters(model)])
    for plain, offloaded in zip(*grads):
        assert torch.equal(plain, offloaded)
