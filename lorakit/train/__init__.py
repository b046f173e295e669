"""Fine-tuning: data (sources.py: reading files; formats.py: record shapes; data.py: label masks, batches, packing), loop, checkpoints.

``train(model, tokenizer, records, config=TrainConfig(...))`` is the whole loop as one function; ``lorakit train``
is its command line.

The names load on first use (PEP 562), as in ``lorakit/__init__.py``: ``lorakit train --help`` imports this package
(its command module is ``lorakit.train.cli``), and the loop imports torch, seconds before the help could print.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from lorakit._lazy import lazy_attributes as _lazy_attributes

# public name -> module that defines it; loaded by __getattr__ below on first use
_LAZY: dict[str, str] = {
    "train": "lorakit.train.loop", "TrainResult": "lorakit.train.loop",
    "TrainConfig": "lorakit.train.config", "TrainingInterrupted": "lorakit.train.stopping",
}

if _TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import TrainResult, train
    from lorakit.train.stopping import TrainingInterrupted

__all__ = ["train", "TrainConfig", "TrainResult", "TrainingInterrupted"]


__getattr__, __dir__ = _lazy_attributes(__name__, _LAZY, globals())
