"""Fine-tuning: data (sources.py: reading files; formats.py: record shapes; data.py: label masks, batches, packing), loop, checkpoints.

``train(model, tokenizer, records, config=TrainConfig(...))`` is the whole loop as one function; ``lorakit train``
is its command line.
"""

from lorakit.train.config import TrainConfig
from lorakit.train.loop import TrainResult, train

__all__ = ["train", "TrainConfig", "TrainResult"]
