"""LoRA on ``torch.nn.MultiheadAttention``: peft's ``lora.MultiheadAttention``, term for term.

nn.MultiheadAttention holds its query/key/value projection as one raw parameter ``in_proj_weight (3E, E)`` and hands
it and ``out_proj.weight (E, E)`` straight to ``F.multi_head_attention_forward``: no Linear forward runs inside it,
so LoRA on ``out_proj`` as a layer would never act. Adapting the attention module itself adapts both projections,
with one rank and alpha: ``adapters[name] = {"in_proj_weight": (r, E) -> (3E, r), "out_proj_weight": (r, E) ->
(E, r)}`` (``ParamAdapter``s of one expert). During each forward the module sees the merged weights, in the active
adapters' order and in peft's order of operations and roundings, so outputs equal peft's bit for bit, float32 and
16-bit alike (peft merges the weights before the call and subtracts them after it):

* ``in_proj_weight + d_in`` with ``d = (B @ A) * s``;
* ``(out_proj.weight + d_out) + d_out``: peft 0.21 adds out_proj's delta twice, in its forward and in
  merge_and_unload alike (``MultiheadAttention.merge`` adds it, then calls ``out_proj.merge``, which
  adds it again; huggingface/peft PR #3774). lorakit does the same (``APPLIED``), so a file means the same model in
  both libraries: peft's adapters load with the outputs they were trained and evaluated with, and lorakit's saved
  adapters run in peft as in lorakit. lorakit's gradients are those of this forward (peft's autograd sees d_out once,
  so its gradients of the out_proj part are half of lorakit's; the in_proj part's are equal).

File keys are peft's: ``<path>.lora_A.weight`` / ``lora_B.weight`` for in_proj and
``<path>.base_layer.out_proj.lora_A.weight`` / ``lora_B.weight`` for out_proj (``FILE_INFIXES``).

Limits, as in peft: query, key and value of one size (``kdim == vdim == embed_dim``, one ``in_proj_weight``); no DoRA;
no dropout (the update lives in the weights, where the input's dropout cannot be applied; peft ignores lora_dropout
here too). Mixed-adapter batches (which peft refuses) run each group of rows through the module with its adapter,
for ``batch_first=True`` modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.param_lora import ParamLora, _own_tensor

# adapter part -> (attribute path of its base tensor in the module, key infix in peft's file)
PARTS = {"in_proj_weight": (("in_proj_weight",), ""), "out_proj_weight": (("out_proj", "weight"), ".base_layer.out_proj")}
FILE_INFIXES = {part: infix for part, (_, infix) in PARTS.items()}
APPLIED = {"in_proj_weight": 1, "out_proj_weight": 2}  # times peft adds each part's delta (see the module docstring)


def check_attention(module: nn.MultiheadAttention, path: str, variant: str, init: str) -> None:
    """Refuse, in one line, what peft's lora.MultiheadAttention refuses too (before any module is touched)."""
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        raise LorakitError(f"target {path!r} is an nn.MultiheadAttention with kdim/vdim ({module.kdim}/{module.vdim}) other "
                           f"than embed_dim ({module.embed_dim}), which keeps q, k and v in three weights; LoRA on the "
                           "attention module needs the one in_proj_weight (peft refuses it too): leave it out of "
                           "target_modules")
    if "dora" in variant:
        raise LorakitError(f"target {path!r} is an nn.MultiheadAttention, which has no DoRA form (peft refuses it too); "
                           "use variant='lora' or 'rslora', or leave it out of target_modules")
    if init not in ("default", "gaussian"):
        raise LorakitError(f"init={init!r} cannot be used on the nn.MultiheadAttention {path!r} (it needs one weight "
                           "matrix per layer); use init='default' or leave it out of target_modules")


class MhaLora(ParamLora):
    """An ``nn.MultiheadAttention`` with LoRA on ``in_proj_weight`` and ``out_proj.weight`` (see the module docstring).

    x (N, L, E) (or (L, N, E)) in, the attention's (output, weights) out, as the wrapped module."""

    def parameter(self, part: str) -> nn.Parameter:
        """The base tensor an adapter part changes (``in_proj_weight`` or ``out_proj.weight``)."""
        owner, attr = self._owner(part)
        return owner._parameters[attr]

    def _owner(self, part: str) -> tuple[nn.Module, str]:
        *parents, attr = PARTS[part][0]
        owner = self.base_layer
        for name in parents:
            owner = getattr(owner, name)
        return owner, attr

    def parameter_names(self, adapter: str | None = None) -> list[str]:
        return list(PARTS)

    def add_adapter(self, name: str, parameters: dict[str, tuple[int, float]], variant: str, init: str,
                    dtype: torch.dtype | None = None) -> nn.ModuleDict:
        """``parameters`` names both parts with one (rank, alpha): peft's layer adapts in_proj and out_proj together."""
        if set(parameters) != set(PARTS) or len(set(parameters.values())) != 1:
            raise LorakitError("LoRA on an nn.MultiheadAttention adapts in_proj_weight and out_proj.weight together, with "
                               f"one rank and alpha (got {sorted(parameters)})")
        return super().add_adapter(name, parameters, variant, init, dtype)

    def _weights_of(self, part: str) -> torch.Tensor:
        """The tensor the module holds for ``part`` (in a DataParallel replica: its per-device copy)."""
        owner, attr = self._owner(part)
        return _own_tensor(owner, attr)

    # -- forward -------------------------------------------------------------------------------------------------
    def adapted_parameters(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``{part: W + deltas of names}``; each delta ``((B @ A) * s)`` cast to W's dtype and added in turn (peft's
        merge, so the same bits)."""
        weights: dict[str, torch.Tensor] = {}
        for name in names:
            for part, adapter in self.adapters[name].items():
                current = weights.get(part)
                if current is None:
                    current = self._weights_of(part)
                with torch.autocast(device_type=current.device.type, enabled=False):
                    delta = (adapter.lora_B @ adapter.lora_A) * adapter.scaling  # in the adapter's dtype
                    dtype = current.dtype
                    current = current + delta.to(dtype)
                    if self.times_applied(part) == 2:  # peft's out_proj.merge: weight.data += delta, added unrounded
                        current = (current + delta).to(dtype)
                weights[part] = current
        return weights

    def tensor_path(self, part: str) -> str:
        """Where the attention reads ``part``'s tensor (``ParamLora._call_with`` puts the adapted one there)."""
        return ".".join(PARTS[part][0])

    def _forward_mixed(self, args: tuple, kwargs: dict) -> Any:
        if not self.base_layer.batch_first:
            raise LorakitError("mixed_batch: an nn.MultiheadAttention with batch_first=False takes (sequence, batch, "
                               "dim) inputs, so lorakit cannot split its batch rows by adapter; use one adapter at a time "
                               "(lorakit.set_adapter)")
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if isinstance(mask, torch.Tensor) and mask.ndim == 3 and self.base_layer.num_heads > 1:
            raise LorakitError("mixed_batch: a 3-D attn_mask of nn.MultiheadAttention holds batch x heads rows, which "
                               "lorakit cannot split by adapter; use one adapter at a time (lorakit.set_adapter)")
        return super()._forward_mixed(args, kwargs)

    # -- merge: ParamLora's merge / unmerge, with out_proj's delta added (and removed) twice ------------------------
    def times_applied(self, part: str) -> int:
        return APPLIED[part]
