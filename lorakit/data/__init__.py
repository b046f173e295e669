"""The dataset that ships with lorakit, for ``lorakit train`` with no arguments, and its scorer.

Task ``orders``: a shop-order sentence -> a JSON record with keys item, qty, city, day in that order
(see ``make_orders.py``, which generated the files deterministically). The base SmolLM2-135M-Instruct does
not know the format; a short LoRA run learns it. Score generations with :func:`exact_match_score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lorakit.errors import LorakitError

EMBEDDED_TASK = "orders"
# Generation length for scoring: the longest answer is 34 SmolLM2 tokens with its <|im_end|> (mean 29.6); 32 new
# tokens cut one validation answer short, which then fails exact match.
EVAL_MAX_NEW_TOKENS = 48


def embedded_dataset_paths() -> tuple[Path, Path]:
    """(train, validation) JSONL files of the embedded dataset (messages shape, 400 and 60 examples)."""
    folder = Path(__file__).resolve().parent
    paths = folder / f"{EMBEDDED_TASK}_train.jsonl", folder / f"{EMBEDDED_TASK}_val.jsonl"
    for p in paths:
        if not p.is_file():
            raise LorakitError(f"embedded dataset file missing: {p}; reinstall lorakit (package data was not installed)")
    return paths


def exact_match(prediction: str, reference: str) -> bool:
    """True when the generation equals the reference, ignoring leading and trailing whitespace."""
    return prediction.strip() == reference.strip()


def exact_match_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The share of predictions (0..1) that exactly match their reference."""
    if len(predictions) != len(references):
        raise LorakitError(f"{len(predictions)} predictions for {len(references)} references; give one per reference")
    if not references:
        raise LorakitError("no references to score against")
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(references)
