"""Follow-ups of the fourteenth session (lead)."""

from __future__ import annotations

from lorakit.train.config import TrainConfig
from lorakit.train.data import build_dataset
from lorakit.train.loop import train
from test_train_helpers import SMALL, task_records, tiny_tokenizer, tiny_train_model


def test_a_run_says_how_many_rows_each_epoch_leaves_out():
    """6 rows in micro-batches of 4 trained on 4 rows an epoch (a third of a small set) without a word."""
    tok = tiny_tokenizer()
    lines = []
    data = build_dataset(task_records(6, seed=1), tok, max_length=32)
    train(tiny_train_model(), tok, data, TrainConfig(**{**SMALL, "batch_size": 4, "max_steps": 3}), log=lines.append)
    assert ("each epoch trains on 4 of the 6 rows, in full micro-batches of 4; the 2 left out change with each "
            "epoch's shuffle") in lines
    lines.clear()  # every row in a batch, or a run shorter than one epoch: nothing to say
    train(tiny_train_model(), tok, data, TrainConfig(**{**SMALL, "batch_size": 3, "max_steps": 3}), log=lines.append)
    train(tiny_train_model(), tok, data, TrainConfig(**{**SMALL, "batch_size": 4, "max_steps": 1}), log=lines.append)
    assert not any("each epoch" in line for line in lines)


def test_regex_check_without_child_processes_lets_the_adapter_load(monkeypatch):
    """A sandbox or a frozen app that cannot start a child process: the patterns are matched unguarded (as peft
    does) instead of refusing every adapter whose config holds a regular expression."""
    import subprocess

    from lorakit import _regex_guard
    from lorakit.config import LoraConfig

    def no_processes(*args, **kwargs):
        raise PermissionError("process creation is not allowed here")

    monkeypatch.setattr(subprocess, "run", no_processes)
    config = LoraConfig(r=2, target_modules=r".*\.(q_proj|v_proj)")
    _regex_guard.check_regexes(config, ["model.layers.0.self_attn.q_proj"], "adapter x")  # no error
