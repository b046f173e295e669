"""``lorakit train``'s optimisation options as a researcher tuning a run uses them (twenty-fourth follow-up): a NaN
loss mid-run, and the metrics file's epoch. Each test's docstring says what was wrong; tiny models throughout
(tests/test_train_helpers.py).

Audited and found right (no test here, the existing suites cover them): grad accumulation (batch 8 x 1, 4 x 2, 2 x 4
and 1 x 8 give the same losses and weights to 3e-7, token-weighted), the validation loss (equal to a manual
per-token mean over the rows), clipping (the update sees the clipped norm, metrics.jsonl the norm before it), seeds,
and the schedules (transformers' get_scheduler's values from the warmup's end on; lorakit's warmup is a step ahead,
its first step at lr/warmup rather than 0, as lorakit.optim.Schedule documents).
"""

from __future__ import annotations

import json
import math

import pytest

from lorakit.errors import LorakitError
from lorakit.train import TrainConfig, train
from test_train_helpers import SMALL, task_records, tiny_tokenizer, tiny_train_model

# lora_B's learning rate 2e-3 x 1e36: the first update makes B ~1e33, and every later forward overflows to NaN
BLOW_UP = dict(loraplus_ratio=1e36, warmup_steps=0, max_grad_norm=1.0)


def _config(**changes) -> TrainConfig:
    return TrainConfig(**{**SMALL, "rank": 2, **changes})


def test_a_run_that_ends_inside_a_nan_streak_saves_no_broken_adapter(tmp_path):
    """An update that broke the weights (loss NaN from then on) less than --max-bad-steps steps before the end: the
    NaN steps were skipped, the run said 'done' with the last good step's loss, exited 0 and saved RUN/adapter, an
    adapter whose every output is NaN. Now the weights are checked on other training rows and the run stops with a
    line naming the update that broke them; no adapter is written."""
    out = tmp_path / "run"
    with pytest.raises(LorakitError) as error:
        train(tiny_train_model(), tiny_tokenizer(), task_records(24, seed=1), _config(max_steps=3, **BLOW_UP),
              out=out, log=lambda message: None)
    message = str(error.value)
    assert message.startswith("2 steps in a row had a NaN or infinite loss (last at step 3); lower --lr (now 0.005)")
    assert "the update of step 1 broke them" in message
    assert "--loraplus-ratio (now 1e+36" in message and "\n" not in message
    assert not (out / "adapter").exists()


def test_max_bad_steps_says_when_resuming_cannot_help(tmp_path):
    """--max-bad-steps stopping a run whose weights are broken said 'lower --lr ... or check the data'; the natural
    next command, --resume with a lower --lr, loaded the same broken weights and failed again after as many steps.
    Now it says the checkpoints since the breaking update hold those weights."""
    with pytest.raises(LorakitError) as error:
        train(tiny_train_model(), tiny_tokenizer(), task_records(24, seed=1),
              _config(max_steps=10, max_bad_steps=2, save_every=2, **BLOW_UP), out=tmp_path / "run",
              log=lambda message: None)
    message = str(error.value)
    assert message.startswith("2 steps in a row had a NaN or infinite loss (last at step 3)")
    assert "the update of step 1 broke them" in message and "resuming from them does not help" in message


def test_one_nan_batch_at_the_end_still_saves_the_adapter(tmp_path, monkeypatch):
    """The other side of the check above: a NaN that one batch gives (the weights fine on other rows) at the last
    step is skipped as before, and the adapter is saved."""
    import lorakit.train.loop as loop

    real, calls = loop.accumulate_gradients, []

    def nan_at_the_last_step(*args, **kwargs):
        calls.append(1)
        summed = real(*args, **kwargs)
        return float("nan") if len(calls) == 3 else summed

    monkeypatch.setattr(loop, "accumulate_gradients", nan_at_the_last_step)
    result = train(tiny_train_model(), tiny_tokenizer(), task_records(24, seed=1), _config(max_steps=3),
                   out=tmp_path / "run", log=lambda message: None)
    assert result.stopped == "completed" and result.skipped_steps == 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_epoch_in_metrics_reaches_one_at_the_end_of_one_epoch(tmp_path):
    """metrics.jsonl's epoch divided the rows seen by all the rows, though an epoch trains full micro-batches only:
    39 rows in batches of 8 with --epochs 1 ended at epoch 0.8205. It is now the share of the epoch's rows."""
    train(tiny_train_model(), tiny_tokenizer(), task_records(39, seed=1), _config(batch_size=8, epochs=1.0),
          out=tmp_path / "run", log=lambda message: None)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [line["epoch"] for line in lines if line["kind"] == "train"]
    assert epochs == [0.25, 0.5, 0.75, 1.0]
    assert all(math.isfinite(line["loss"]) for line in lines if line["kind"] == "train")


def test_a_run_nan_from_its_first_step_to_its_end_is_not_done(tmp_path):
    """Every step NaN (the model as given overflows), fewer steps than --max-bad-steps: the run said 'done', exit 0,
    and saved the adapter it never trained. It now stops with --max-bad-steps' line, which names the data."""
    model = tiny_train_model()
    model.model.layers[0].register_forward_hook(
        lambda module, args, output: (output[0] * float("nan"),) + tuple(output[1:]) if isinstance(output, tuple)
        else output * float("nan"))
    with pytest.raises(LorakitError, match=r"^2 steps in a row had a NaN or infinite loss \(last at step 2\).*check the data"):
        train(model, tiny_tokenizer(), task_records(24, seed=1), _config(max_steps=2), out=tmp_path / "run",
              log=lambda message: None)
    assert not (tmp_path / "run" / "adapter").exists()


def test_validation_losses_go_through_log(capsys):
    """train(..., log=f) from Python with plain progress lines: every line went to f but the validation losses,
    printed straight to stderr (a notebook's logger never saw them)."""
    lines: list[str] = []
    train(tiny_train_model(), tiny_tokenizer(), task_records(16, seed=1), _config(max_steps=2, eval_every=1),
          val_data=task_records(4, seed=2), log=lines.append)
    assert [line for line in lines if "validation loss" in line] == [
        line for line in lines if line.startswith(("step 1: validation loss", "step 2: validation loss"))]
    assert sum("validation loss" in line for line in lines) == 2
    assert "validation loss" not in capsys.readouterr().err
