"""Token ids past the model's embedding rows: a model folder whose tokenizer holds more tokens than the model.

Tokens added to a tokenizer without ``model.resize_token_embeddings`` (Llama 2 fine-tunes that added "[PAD]" as id
32000 to a 32000-row model are the common case) have ids the embedding cannot look up: the first batch that
held one stopped training with ``IndexError: index out of range in self``, a traceback naming no token. Padding is
masked out (attention and loss), so a pad token past the rows is replaced by the eos token at load; a token past
the rows in the data itself is refused by name, before training.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

from lorakit.errors import LorakitError


def embedding_rows(model) -> int | None:
    """The number of rows of the model's input embedding ``(rows, dim)``, or None where it has none to ask."""
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):
        return None
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def fit_pad_token(model, tokenizer, where: str) -> None:
    """Use the eos token for padding when the tokenizer's pad token is past the model's embedding rows (a warning
    says so); refuse when the eos token is past them too: then the tokenizer is not this model's."""
    rows = embedding_rows(model)
    pad = getattr(tokenizer, "pad_token_id", None)
    if rows is None or not isinstance(pad, int) or pad < rows:
        return
    eos = getattr(tokenizer, "eos_token_id", None)
    sizes = f"the tokenizer has {len(tokenizer):,} tokens, the model {rows:,} embedding rows"
    if not isinstance(eos, int) or eos >= rows:
        raise LorakitError(f"{where}: the tokenizer's pad token {tokenizer.pad_token!r} (id {pad}) and its eos token "
                           f"are past the model's embedding rows ({sizes}): the tokenizer is not this model's; use the "
                           "tokenizer saved with the model")
    warnings.warn(f"{where}: the tokenizer's pad token {tokenizer.pad_token!r} is id {pad}, past the model's embedding "
                  f"rows ({sizes}: added without resizing the model), so the eos token {tokenizer.eos_token!r} pads "
                  "instead (padding is masked out)", stacklevel=3)
    tokenizer.pad_token = tokenizer.eos_token


def check_ids_fit(model, tokenizer, datasets: Iterable[tuple[str, Any]]) -> None:
    """Refuse tokenized rows (``dataset.rows[i]["input_ids"]``) that hold an id past the model's embedding rows,
    naming the token and how to fix the folder. Nothing to scan when the tokenizer has no more tokens than rows."""
    rows = embedding_rows(model)
    if rows is None or len(tokenizer) <= rows:
        return
    for name, dataset in datasets:
        if dataset is not None:
            _refuse_past(tokenizer, rows, [row["input_ids"] for row in dataset.rows], f"the {name} data", "row")


def check_prompt_ids_fit(model, tokenizer, prompts: Iterable[list[int]]) -> None:
    """:func:`check_ids_fit` for encoded prompts (``lorakit generate``): a chat template's markup tokens added to
    the tokenizer without resizing the model were refused as "outside this model's vocabulary; encode prompts with
    this model's tokenizer", which the user had done."""
    rows, prompts = embedding_rows(model), list(prompts)
    if rows is not None and len(tokenizer) > rows:
        _refuse_past(tokenizer, rows, prompts, "the prompt" if len(prompts) == 1 else "a prompt", "prompt")


def _refuse_past(tokenizer, rows: int, sequences: list[list[int]], what: str, unit: str) -> None:
    """Refuse, naming the first token and how to fix the folder, when any of ``sequences`` holds an id ``>= rows``."""
    past = [max(ids) for ids in sequences if ids and max(ids) >= rows]
    if past:
        token = tokenizer.convert_ids_to_tokens(past[0])
        raise LorakitError(f"{what} holds the token {token!r} (id {past[0]}; {len(past)} {unit}"
                           f"{'s hold' if len(past) > 1 else ' holds'} ids past the model's {rows:,} embedding "
                           f"rows): the tokenizer has {len(tokenizer):,} tokens, more than the model was built "
                           "for (tokens added without resizing it); resize the model once (model."
                           "resize_token_embeddings(len(tokenizer)), then save_pretrained), or use the "
                           "tokenizer saved with the model")
