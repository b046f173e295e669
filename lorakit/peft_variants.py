"""peft 0.21's LoRA variants whose saved tensors are a plain LoRA in another form, read as that plain LoRA.

``read_adapter`` accepts their config fields (``check_options``) and ``load_adapter`` converts their tensors for
the model at hand (``to_plain_lora``), so lorakit runs, merges and serves them with peft's logits:

* VeLoRA (``velora_config``): compresses the input saved for the backward pass only; the forward is B A x, so its
  ``lora_velora_embed`` (the compression direction) is dropped.
* MonteCLoRA (``monteclora_config``): samples noise on A in training only; in eval (and in peft's merge) it is
  B A x, so its ``lora_monteclora_sampler.*`` tensors are dropped.
* QA-LoRA (``use_qalora``): on GPTQ layers A (r, in / g) reads the input averaged over groups of g features and
  multiplied by in / g, which is the plain A' (r, in) with A'[:, k] = A[:, k // g] * (in / g) / g. peft ignores the
  option on other layers (A is (r, in) then, kept as it is).
* BD-LoRA (``use_bdlora``): A (or B) of the modules its patterns name is block-diagonal, saved as the stacked blocks
  (r, in / n) (or (out, r / n)); expanded to the dense block-diagonal matrix.
* KaSA (``kasa_config``): the update is B diag(d) A (``lora_diag`` d folded into B here), on a base whose r
  smallest singular components peft removed: ``lorakit.io._plain_form`` adds those back as a LoRA of rank 2r on
  the untouched base (``AdapterFile.base_rewrite`` is "kasa").

None of them can continue training in lorakit (another parameterization or training rule), so ``trainable=True``
is refused in one line (``refuse_training``), as for peft's PiSSA / OLoRA inits (loaded at rank 2r: the init's half
would train too) and MiCA (peft keeps its B frozen); ``lorakit.save_adapter`` writes any of them as a plain LoRA,
which trains as one. Adapters of another peft_type that are a low-rank product (AdaLoRA, VeRA, LoHa, LoKr) are
read as LoRA by ``lorakit.peft_types`` and fitted to the model here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from lorakit import peft_types
from lorakit.config import _RESIDUAL_INITS, shown
from lorakit.errors import LorakitError

# config field -> the method, and what its training has that lorakit's plain form lacks
FIELDS = {
    "velora_config": "VeLoRA (peft trains it with a compressed backward pass)",
    "monteclora_config": "MonteCLoRA (peft trains it with noise sampled on A)",
    "use_qalora": "QA-LoRA (peft trains its pooled A)",
    "use_bdlora": "BD-LoRA (peft trains the diagonal blocks only)",
    "kasa_config": "KaSA (peft trains B, A and the diagonal on its truncated base)",
}
# init_lora_weights -> the same, for inits whose saved adapter lorakit loads in another form
_INITS = {
    "pissa": "PiSSA (loaded at rank 2r, so the init's own half would train too; peft trains A and B only)",
    "olora": "OLoRA (loaded at rank 2r, so the init's own half would train too; peft trains A and B only)",
    "mica": "MiCA (peft keeps its B frozen)",
}
# tensors that only training reads: the forward and the merge never do
_TRAINING_ONLY = {"velora_config": (".lora_velora_embed",), "monteclora_config": (".lora_monteclora_sampler.",)}


def chosen(raw_config: Any) -> list[str]:
    """The variant fields this config switches on, as peft reads them (a sub-config given, even ``{}``; a true flag)."""
    if not isinstance(raw_config, dict):
        return []
    return [name for name in FIELDS if (raw_config.get(name) is True if name == "use_qalora"
                                        else raw_config.get(name) is not None)]


def check_options(raw_config: dict[str, Any], where: str) -> dict[str, Any]:
    """``raw_config`` with these variants' fields checked and set back to peft's defaults (so ``LoraConfig`` reads
    the rest); a malformed value, or a combination peft cannot make either, is refused in one line."""
    if raw_config.get("use_qalora") is not None and not isinstance(raw_config.get("use_qalora"), bool):
        raise LorakitError(f"{where}: use_qalora must be true or false, got {shown(raw_config.get('use_qalora'))}")
    names = chosen(raw_config)
    for name in names:
        value = raw_config[name]
        if name != "use_qalora" and not isinstance(value, dict):
            raise LorakitError(f"{where}: {name} must be an object of settings (as peft writes it), got {shown(value)}")
    if "use_qalora" in names:
        size = raw_config.get("qalora_group_size", 16)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise LorakitError(f"{where}: qalora_group_size must be a positive integer, got {shown(size)}")
    if "use_bdlora" in names:
        _bd_settings(raw_config["use_bdlora"], where)
    clash = [n for n in names if n != "kasa_config"] + (["use_dora=True"] if raw_config.get("use_dora") else [])
    if "kasa_config" in names and clash:  # peft 0.21 refuses these combinations ("unsupported variant combination")
        raise LorakitError(f"{where}: kasa_config together with {', '.join(clash)} is not an adapter peft makes, and "
                           "lorakit cannot tell which base it belongs to; save it again with KaSA alone")
    init = raw_config.get("init_lora_weights", True)
    if "kasa_config" in names and isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        # peft makes it: the init rewrites the base (pissa / olora: W - s B0 A0), then KaSA truncates what is left.
        # lorakit repeats one rewrite per adapter (``io._plain_form``); inits that leave the base alone (orthogonal,
        # eva, gaussian) are plain KaSA adapters and load as such
        raise LorakitError(f"{where}: kasa_config with init_lora_weights={shown(init)}: peft rewrote the base twice (the "
                           "init, then KaSA's truncation of what it left), and lorakit repeats one such rewrite only; "
                           "merge the adapter with peft (merge_and_unload) and load the merged model")
    return {**raw_config, **{name: False if name == "use_qalora" else None for name in FIELDS},
            "qalora_group_size": 16}


def _bd_settings(value: dict[str, Any], where: str) -> tuple[list[str], list[str], int]:
    """BD-LoRA's (patterns of block-diagonal A, of block-diagonal B, number of blocks), checked."""
    a, b, blocks = value.get("target_modules_bd_a") or [], value.get("target_modules_bd_b") or [], value.get("nblocks")
    for name, patterns in (("target_modules_bd_a", a), ("target_modules_bd_b", b)):
        if not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
            raise LorakitError(f"{where}: use_bdlora.{name} must be a list of module-name parts, got {shown(patterns)}")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise LorakitError(f"{where}: use_bdlora.nblocks must be a positive integer, got {shown(blocks)}")
    return a, b, blocks


def refuse_training(adapter_file: Any) -> None:
    """One line when ``adapter_file`` (an ``io.AdapterFile``) is a method lorakit can run but not train as peft does."""
    from lorakit.io import CONFIG_NAME

    raw = adapter_file.raw_config
    init = raw.get("init_lora_weights") if isinstance(raw, dict) else None
    converted = peft_types.training_reason(raw)  # AdaLoRA's LoRA fields (inits, variants) are not run by peft: unsaid
    methods = [converted] if converted else [FIELDS[n] for n in chosen(raw)] + (
        [_INITS[init.lower()]] if isinstance(init, str) and init.lower() in _INITS else [])
    if methods:
        raise LorakitError(f"{adapter_file.folder / CONFIG_NAME}: {'; '.join(methods)}: lorakit loads it as the plain LoRA "
                           "it equals when it runs, which trains differently; load it with trainable=False to run or "
                           "merge it (lorakit.save_adapter then writes that plain LoRA, which trains as one), or continue "
                           "its training with peft")


def to_plain_lora(model: nn.Module, adapter_file: Any, trainable: bool) -> Any:
    """``adapter_file`` (an ``io.AdapterFile``) with these variants' tensors as a plain LoRA's for ``model`` (the same
    object when it uses none). Shapes that fit no form are left as they are, for ``plan_load`` to name."""
    from lorakit import quant
    from lorakit.inject import _base_modules
    from lorakit.io import CONFIG_NAME, _strip

    if trainable:
        refuse_training(adapter_file)
    if peft_types.peft_type(adapter_file.raw_config):  # AdaLoRA, VeRA, LoHa: read as LoRA already, fitted here
        return dataclasses.replace(adapter_file, tensors=peft_types.fit_to_model(
            _base_modules(model), adapter_file.raw_config, adapter_file.tensors, str(adapter_file.folder)))
    names = chosen(adapter_file.raw_config)
    if not names:
        return adapter_file
    where = adapter_file.folder / CONFIG_NAME
    raw = adapter_file.raw_config
    modules = _base_modules(model)
    skipped = tuple(part for name in names for part in _TRAINING_ONLY.get(name, ()))
    tensors = {key: value for key, value in adapter_file.tensors.items()
               if not any(part in key or key.endswith(part) for part in skipped)}
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        path = _strip(key)[: -len(".lora_A.weight")]
        key_B = key[: -len("lora_A.weight")] + "lora_B.weight"
        lora_A, lora_B = tensors[key], tensors.get(key_B)
        if lora_B is None or lora_A.dim() != 2 or lora_B.dim() != 2:
            continue  # missing or odd tensors: plan_load names them
        if "use_bdlora" in names:
            patterns_A, patterns_B, blocks = _bd_settings(raw["use_bdlora"], str(where))
            if any(p in path for p in patterns_A):  # peft's rule: the pattern is a part of the module path
                lora_A = torch.block_diag(*torch.chunk(lora_A, blocks, dim=0))  # (r, in / n) -> (r, in)
            elif any(p in path for p in patterns_B):
                lora_B = torch.block_diag(*torch.chunk(lora_B, blocks, dim=0))  # (out, r / n) -> (out, r)
        if "use_qalora" in names and path in modules and quant.is_linear_like(modules[path]):
            size = raw.get("qalora_group_size", 16)
            in_features = quant.linear_shape(modules[path])[1]
            # pooled: A reads in / g group means, times in / g. (With g = 1 both forms have A (r, in): taken as the
            # dense layers' plain LoRA, since QA-LoRA over groups of one feature pools nothing.)
            if lora_A.shape[1] * size == in_features and size > 1:
                lora_A = lora_A.repeat_interleave(size, dim=1) * (lora_A.shape[1] / size)
        if "kasa_config" in names:
            diag = tensors.pop(key[: -len("lora_A.weight")] + "lora_diag", None)
            if diag is None or tuple(diag.shape) != (lora_B.shape[1],):
                raise LorakitError(f"{adapter_file.folder}: {key[: -len('lora_A.weight')]}lora_diag (KaSA's diagonal, one "
                                   f"value per rank) is {'missing' if diag is None else f'of shape {tuple(diag.shape)}'}; "
                                   "save the adapter again with peft")
            lora_B = lora_B * diag.to(lora_B.dtype)  # B diag(d) A
        tensors[key], tensors[key_B] = lora_A, lora_B
    return dataclasses.replace(adapter_file, tensors=tensors)
