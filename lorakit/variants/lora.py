"""Plain LoRA (Hu et al. 2021) and rsLoRA (Kalajdzievski 2023): ``y = x W^T + s * dropout(x) A^T B^T``
(``+ s * b`` with a ``lora_bias``, PEFT's, which a merge adds to the base's bias).

rsLoRA differs only in the scaling: alpha / sqrt(r) instead of alpha / r, which keeps the update's magnitude
stable as the rank grows.
"""

from __future__ import annotations

import torch

from lorakit import functional as LF
from lorakit.variants.base import Variant


class LoRA(Variant):
    name = "lora"
    plain = True

    def forward(self, adapter, x, base_out, base_weight, base_bias=None):
        return base_out + LF.lora_delta_output(adapter.dropout(x), adapter.lora_A, adapter.lora_B, adapter.scaling,
                                               base_out.dtype, adapter.lora_bias)

    def embedding_forward(self, adapter, low_rank, base_out, base_rows, base_weight):
        return base_out + low_rank.to(base_out.dtype)

    def merged_weight(self, adapter, base_weight: torch.Tensor, unmerged_weight: torch.Tensor | None = None
                      ) -> torch.Tensor:
        return base_weight + LF.delta_weight(adapter.lora_A, adapter.lora_B, adapter.scaling)

    def unmerged_weight(self, adapter, merged_weight: torch.Tensor, forget: bool = True) -> torch.Tensor:
        return merged_weight - LF.delta_weight(adapter.lora_A, adapter.lora_B, adapter.scaling)

    def merged_bias(self, adapter) -> torch.Tensor:
        return adapter.lora_bias.detach().float() * adapter.scaling


class RsLoRA(LoRA):
    name = "rslora"
