"""peft's TrainableTokens method (``peft_type: "TRAINABLE_TOKENS"``): trained rows of an embedding, no LoRA.

``peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[...])`` saves, for each module it
targets, ``base_model.model.<path>.trainable_tokens_delta (k, dim)``: the new values of rows ``token_indices`` of
the embedding ``(vocab, dim)`` (or of an output head ``(vocab, dim)``), and the same rows again under the path of
the output head tied to the embedding (peft ties the head's rows to the embedding's). These are the rows a LoRA file
with ``trainable_token_indices`` saves as ``<path>.token_adapter.trainable_tokens_delta``, applied by the same peft
layer (``TrainableTokensLayer``: index_copy into the weight, then the module's own lookup / matmul). So
``read_adapter`` reads such a folder as a LoRA file of these token rows and no LoRA layer (:func:`to_lora_form`);
loading, merging, serving and the static decoder's refusal then take the token-row path of LoRA files
(``lorakit.io._token_copies``, ``lorakit.token_rows``, ``lorakit.serve.copies``). The file's config stays the
adapter's ``raw_config``: ``AdapterFile.token_indices`` reads ``token_indices`` from it.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from lorakit.config import LoraConfig, _is_off, shown
from lorakit.errors import LorakitError
from lorakit.token_rows import TOKEN_DELTA, check_indices

KIND = "TRAINABLE_TOKENS"
FIELD = "token_indices"  # the config's name for the trained rows (LoRA's: trainable_token_indices)
_DELTA = ".trainable_tokens_delta"
# peft 0.21's TrainableTokensConfig fields; the tensors say which modules hold rows, and init_weights only chose
# the rows' values before training
_KNOWN_FIELDS = {"peft_type", "token_indices", "target_modules", "init_weights", "base_model_name_or_path", "revision",
                 "task_type", "inference_mode", "auto_mapping", "peft_version"}


def is_trainable_tokens(raw_config: Any) -> bool:
    """Whether ``raw_config`` (a parsed adapter_config.json) is peft's TrainableTokens method's."""
    kind = raw_config.get("peft_type") if isinstance(raw_config, dict) else None
    return isinstance(kind, str) and kind.upper() == KIND


def origin(raw_config: Any) -> str | None:
    """What the adapter is, for ``lorakit inspect`` (None when it is not this method's)."""
    return ("peft TrainableTokens (TRAINABLE_TOKENS): trained rows of the embedding (and of the head tied to it), "
            "no LoRA layers" if is_trainable_tokens(raw_config) else None)


@dataclasses.dataclass
class TokenRowsConfig(LoraConfig):
    """The ``LoraConfig`` of an adapter that is token rows alone: ``target_modules=[]`` (no LoRA layer; the load adds
    the rows' modules as copies, ``io.fitted_config``). A plain LoraConfig refuses an empty target list, as peft's
    LoraConfig does; its other fields are checked as LoraConfig checks them."""

    def validate(self) -> None:
        stand_in = copy.copy(self)  # the same fields with a target, so only the empty list goes unchecked
        stand_in.target_modules = ["embed_tokens"]
        LoraConfig.validate(stand_in)

    def to_peft_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise LorakitError("this adapter is peft TrainableTokens rows (peft_type TRAINABLE_TOKENS), which lorakit "
                           "loads as whole copies of the embedding and head: it cannot be saved back as a peft adapter; "
                           "its folder is the adapter (or merge it: lorakit merge)")


def to_lora_form(raw_config: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
                 ) -> tuple[TokenRowsConfig, dict[str, torch.Tensor]]:
    """(the adapter's config, its tensors with each ``<path>.trainable_tokens_delta`` renamed to LoRA's
    ``<path>.token_adapter.trainable_tokens_delta``; others kept, for the load to name). ``where`` names the
    config file in errors. Shapes and index ranges are checked against the model by the load."""
    indices = raw_config.get(FIELD)
    if isinstance(indices, dict):  # LoRA's trainable_token_indices may be one; peft's load of this method fails on it
        raise LorakitError(f"{where}: {FIELD} is a map ({shown(indices)}), but peft's TrainableTokensConfig takes one "
                           "list of token ids for all its target_modules (peft's own load fails on a map): write it "
                           "as a list")
    check_indices(indices, where, FIELD, maps=False)
    unknown = [key for key, value in raw_config.items() if key not in _KNOWN_FIELDS and not _is_off(value)]
    if unknown:
        raise LorakitError(f"{where}: unknown field {shown(unknown[0])}={shown(raw_config[unknown[0]])} for peft's "
                           "TrainableTokens (lorakit knows peft 0.21's fields); lorakit cannot apply it. If it does "
                           "not change the adapter's rows, delete it from the file")
    nested = next((key for key in tensors if key.endswith(".base_layer" + _DELTA)), None)
    if nested is not None:  # peft wraps a tied head twice when target_modules names it beside the embedding
        raise LorakitError(f"{where}: {shown(nested)} is a token layer peft nested inside another (target_modules "
                           "names both the embedding and the output head tied to it), which peft's own model cannot run "
                           "(\"TrainableTokensLayer wraps an unknown layer type\"): train it again with the embedding "
                           "alone in target_modules (peft gives the tied head its rows)")
    renamed = {}
    for key, tensor in tensors.items():
        own = key.endswith(_DELTA) and not key.endswith(TOKEN_DELTA)
        renamed[key[: -len(_DELTA)] + TOKEN_DELTA if own else key] = tensor
    if not any(key.endswith(TOKEN_DELTA) for key in renamed):
        raise LorakitError(f"{where}: peft_type {KIND} but the weights hold no trained rows (keys ending in "
                           f"{_DELTA}); save the adapter again with peft")
    return TokenRowsConfig(r=1, alpha=1, target_modules=[]), renamed
