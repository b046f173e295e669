"""``lorakit train`` and ``lorakit.train.train`` with data and habits the earlier audits did not try (eighteenth audit).

1. ``train()`` from Python injected the adapter before it read the records: a bad record was refused with the model
   already holding a rank-4 adapter, and the next call (data fixed, ``rank=8``) trained that rank-4 adapter without a
   word. The data is now tokenized (and a too-small set refused) before the model is touched.
2. ``train(..., out=FOLDER)`` run again without ``resume`` (a notebook cell run twice) appended its steps to the
   earlier run's metrics.jsonl (one loss curve of two runs, steps 1, 2, 3, 1, 2, 3, 4) and left the earlier run's
   checkpoints beside its own; it is refused now, as ``lorakit train`` refuses it, naming ``resume=``.
"""

from __future__ import annotations

import pytest

from lorakit.errors import LorakitError
from lorakit.train import TrainConfig, train
from test_train_helpers import SMALL, task_records, tiny_tokenizer, tiny_train_model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _trainable_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bad", ["empty completion", "too few rows"])
def test_bad_data_from_python_leaves_the_model_untouched(tok, bad):
    import lorakit

    model = tiny_train_model()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    records = task_records(8) + [{"prompt": "copy a : ", "completion": " "}] if bad == "empty completion" else \
        task_records(2)
    with pytest.raises(LorakitError, match="empty completion|fewer than one micro-batch"):
        train(model, tok, records, TrainConfig(**{**SMALL, "rank": 4, "max_steps": 1}))
    assert lorakit.adapter_names(model) == []
    assert model.state_dict().keys() == before.keys()  # no adapter tensors were added
    # the next call, data fixed, trains an adapter of its own config (rank 8), not one left by the failed call
    train(model, tok, task_records(8), TrainConfig(**{**SMALL, "rank": 8, "max_steps": 1}), log=lambda line: None)
    shapes = _trainable_shapes(model)
    assert shapes and all(8 in shape for shape in shapes.values()), shapes


def test_a_new_run_into_an_earlier_runs_folder_is_refused(tok, tmp_path):
    config = TrainConfig(**{**SMALL, "max_steps": 3, "save_every": 0})
    train(tiny_train_model(), tok, task_records(16), config, out=tmp_path, log=lambda line: None)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(LorakitError, match=r"holds an earlier run \(checkpoints/, adapter/\); pass resume=") as error:
        train(tiny_train_model(), tok, task_records(16), config.replace(max_steps=4), out=tmp_path)
    assert "\n" not in str(error.value)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # the earlier run's curve is its own
    # resume= continues it; a folder holding only other files (the data) starts a run as before
    assert train(tiny_train_model(), tok, task_records(16), config.replace(max_steps=4), out=tmp_path,
                 resume=tmp_path, log=lambda line: None).steps == 4
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "train.jsonl").write_text("{}\n")
    assert train(tiny_train_model(), tok, task_records(16), config, out=tmp_path / "fresh",
                 log=lambda line: None).steps == 3
