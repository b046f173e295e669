"""Training rows into batches: packing short examples into rows, padding rows into model inputs, and a seeded,
resumable order of batches.

- :func:`pack_examples` / :func:`block_causal_mask`: best-fit packing and the (B, 1, T, T) mask that keeps packed
  examples apart;
- :class:`Collator`: items (``input_ids``, ``labels``, and for packed rows ``position_ids`` / ``seq_lens``) to the
  padded tensors ``model(**batch)`` takes;
- :func:`epoch_permutation`, :class:`BatchIterator`: the order, a fixed function of (seed, epoch), whose position a
  checkpoint saves and a resume restores exactly; :func:`eval_batches` for validation.

Tokenizing records into items is ``lorakit.train.data``'s work, which re-exports these names.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from lorakit.errors import LorakitError

IGNORE_INDEX = -100  # labels that are not supervised (PyTorch's cross-entropy ignore_index)


# ----------------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------------


def pack_examples(examples: Sequence[Mapping[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Pack tokenized examples into rows of at most ``max_length`` tokens (best-fit decreasing, deterministic).

    Each row holds ``input_ids``, ``labels`` and ``position_ids`` (restarting at 0 for every example), plus
    ``seq_lens`` (the length of each example in the row, in order). The first label of every example is
    IGNORE_INDEX, so no target is predicted from the previous example's last token.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))  # stable: ties keep order
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_length:
            raise LorakitError(f"an example of {n} tokens does not fit a packed row of max_length={max_length}")
        k = bisect.bisect_left(free, (n, -1))  # the fullest row that still has room for n tokens
        if k < len(free):
            space, row = free.pop(k)
            rows[row].append(i)
        else:
            space, row = max_length, len(rows)
            rows.append([i])
        bisect.insort(free, (space - n, row))
    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in members:
            ex = examples[i]
            n = len(ex["input_ids"])
            row["input_ids"] += list(ex["input_ids"])
            row["labels"] += [IGNORE_INDEX] + list(ex["labels"][1:])
            row["position_ids"] += list(range(n))
            row["seq_lens"].append(n)
        packed.append(row)
    return packed


def block_causal_mask(seq_lens: Sequence[Sequence[int]], length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A 4D additive attention mask: causal within each example, nothing across examples.

    Args:
        seq_lens: per row, the lengths of its examples in order; the rest of the row (up to ``length``) is
            padding, which gets a causal block of its own so that no attention row is empty (an all-masked
            row turns into NaN, and NaN values would reach real tokens through 0 * NaN).
        length: T, the padded row length.
        dtype: the model's compute dtype (sdpa needs the mask in the query's dtype, or bool).

    Returns:
        (B, 1, T, T) tensor, 0 where query t may attend to key s and the dtype's minimum elsewhere.
    """
    rows = []
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for lens in seq_lens:
        segment = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(list(lens), dtype=torch.long))
        segment = torch.cat([segment, torch.full((length - len(segment),), len(lens), dtype=torch.long)])
        rows.append((segment[:, None] == segment[None, :]) & causal)
    allowed = torch.stack(rows)[:, None]  # (B, 1, T, T)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


class Collator:
    """Pad a list of dataset items into a batch of tensors (right padding).

    Unpacked items give ``input_ids`` (B, T), ``attention_mask`` (B, T) with 1 on real tokens and 0 on
    padding, and ``labels`` (B, T) with IGNORE_INDEX on padding. Packed items (with ``position_ids``) give
    ``input_ids``, ``labels``, ``position_ids`` (B, T) and either:

    - ``packed_attention="mask"`` (default): ``attention_mask`` (B, 1, T, T) from :func:`block_causal_mask` in
      ``mask_dtype`` (use the model's compute dtype). Works with sdpa and eager, whatever ``use_cache`` is.
    - ``packed_attention="position_ids"``: no attention mask; padding gets its own positions restarting at 0,
      so transformers' packed-sequence detection (and flash attention's varlen path) separates examples.
      The model must then be called with ``use_cache=False``, or attention crosses examples.

    Every value of the batch is a model keyword, so ``model(**batch)`` works.

    Args:
        pad_id: the id written on padding positions (any id: padding is told apart by the mask).
        pad_to_multiple_of: round T up to a multiple of this (e.g. 8 for tensor cores), or None.
    """

    def __init__(
        self,
        pad_id: int,
        *,
        pad_to_multiple_of: int | None = None,
        mask_dtype: torch.dtype = torch.float32,
        packed_attention: str = "mask",
    ):
        if packed_attention not in ("mask", "position_ids"):
            raise LorakitError(f"packed_attention={packed_attention!r} is not 'mask' or 'position_ids'")
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of
        self.mask_dtype, self.packed_attention = mask_dtype, packed_attention

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise LorakitError("cannot collate an empty batch")
        length = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        real = torch.zeros((batch, length), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[i, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(it["labels"], dtype=torch.long)
            real[i, :n] = 1
        packed = ["position_ids" in it for it in items]
        if not any(packed):
            return {"input_ids": input_ids, "attention_mask": real, "labels": labels}
        if not all(packed):
            raise LorakitError("cannot mix packed and unpacked items in one batch; build the dataset with one setting")
        position_ids = torch.zeros((batch, length), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["position_ids"])
            position_ids[i, :n] = torch.as_tensor(it["position_ids"], dtype=torch.long)
            position_ids[i, n:] = torch.arange(length - n)  # padding is one more "example" of its own
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.packed_attention == "mask":
            out["attention_mask"] = block_causal_mask([it["seq_lens"] for it in items], length, self.mask_dtype)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Deterministic, resumable order
# ----------------------------------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of ``n`` examples in ``epoch``: a fixed function of (seed, epoch), stable across runs and
    Python versions (``random.Random`` seeded with an int)."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class BatchIterator:
    """An endless, seeded stream of collated batches whose position can be saved and restored exactly.

    Epoch e visits the dataset in :func:`epoch_permutation` (n, seed, e); the position is (epoch, index within
    that permutation). ``state_dict()`` after k batches, loaded into a new iterator over the same data, makes
    it yield exactly the batches k+1, k+2, ... of the original. With ``drop_last`` (default) every batch is
    full and the tail of an epoch is skipped; otherwise the last batch of an epoch may be smaller.

    Attributes:
        epoch: the epoch the next batch comes from. index: the position of its first example in the
        permutation. batches_per_epoch: full (or, without drop_last, all) batches per epoch.
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, Any]],
        batch_size: int,
        collate_fn: Callable[[list], Any],
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise LorakitError(f"batch_size={batch_size} must be at least 1")
        if drop_last and len(dataset) < batch_size:
            raise LorakitError(
                f"batch_size={batch_size} is larger than the {len(dataset)} training rows; lower it or add data"
            )
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        return self

    def next_indices(self) -> list[int]:
        """The dataset indices of the next batch (advances the position)."""
        n = len(self.dataset)
        if self.index >= n or (self.drop_last and self.index + self.batch_size > n):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = epoch_permutation(n, self.seed, self.epoch, self.shuffle)
        indices = self._order[self.index : self.index + self.batch_size]
        self.index += len(indices)
        return indices

    def __next__(self) -> Any:
        return self.collate_fn([self.dataset[i] for i in self.next_indices()])

    def state_dict(self) -> dict[str, int | bool]:
        """The data position, JSON-serialisable, for a checkpoint."""
        return {
            "epoch": self.epoch, "index": self.index, "seed": self.seed, "num_rows": len(self.dataset),
            "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the data and settings must be the same."""
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        if missing:
            raise LorakitError(f"data position in the checkpoint lacks {missing}; it was not saved by BatchIterator")
        for key in ("num_rows", "seed", "batch_size", "shuffle", "drop_last"):
            if state[key] != expected[key]:
                raise LorakitError(
                    f"checkpoint's data position has {key}={state[key]!r} but this run has {expected[key]!r}; "
                    "resume with the same data, max_length, packing and batch settings"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.dataset):
            raise LorakitError(f"checkpoint's data position epoch={epoch}, index={index} is out of range")
        self.epoch, self.index, self._order = epoch, index, None


def eval_batches(dataset: Sequence[Mapping[str, Any]], batch_size: int, collate_fn: Callable[[list], Any]) -> Iterator[Any]:
    """Every row once, in order, in batches of ``batch_size`` (the last may be smaller): for validation loss."""
    for start in range(0, len(dataset), batch_size):
        yield collate_fn([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
