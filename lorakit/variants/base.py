"""The interface every variant implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from lorakit import functional as LF

if TYPE_CHECKING:  # pragma: no cover
    from lorakit.layers import LoraAdapter


class Variant:
    """Strategy for one kind of adapter. Stateless: all state lives on the ``LoraAdapter`` module.

    ``base_weight`` arguments are the frozen weight in linear form ``(out, in)``; ``base_out`` is the base layer's
    output ``(..., out)`` for the input ``x (..., in)``.
    """

    name = "abstract"
    #: True when the forward is exactly ``base_out + s * dropout(x) A^T B^T`` (lets the layer use fused kernels)
    plain = False

    def scaling(self, rank: int, alpha: float) -> float:
        return LF.scaling(self.name, rank, alpha)

    def init_extra(self, adapter: "LoraAdapter", base_weight: torch.Tensor) -> None:
        """Create variant-specific parameters once A and B exist (DoRA: the magnitude vector)."""

    def forward(
        self, adapter: "LoraAdapter", x: torch.Tensor, base_out: torch.Tensor, base_weight: Callable[[], torch.Tensor],
        base_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``base_out + delta``; ``base_weight()`` returns the dense base weight without merged adapters, only if the
        variant needs it; ``base_out`` is the output so far (the base's, plus any adapter active before this one) and
        ``base_bias`` the bias it holds (None: none)."""
        raise NotImplementedError

    def embedding_forward(
        self, adapter: "LoraAdapter", low_rank: torch.Tensor, base_out: torch.Tensor,
        base_rows: Callable[[], torch.Tensor], base_weight: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """``base_out + delta`` for an embedding, in the linear form ``W = E^T (dim, num_embeddings)``.

        ``low_rank`` is ``s * A^T[ids] B^T`` ``(..., dim)`` in the adapter's dtype (already times the layer's
        ``embed_scale``, if any); ``base_rows()`` is the base layer's own output ``E[ids]`` (times ``embed_scale``)
        without any adapter; ``base_weight()`` the dense ``(dim, num_embeddings)`` weight. Both only if needed.
        """
        raise NotImplementedError

    def merged_weight(self, adapter: "LoraAdapter", base_weight: torch.Tensor,
                      unmerged_weight: torch.Tensor | None = None) -> torch.Tensor:
        """W' such that ``x W'^T`` equals the adapted layer (float32, ``(out, in)``); ``base_weight`` is the weight now
        (with any adapters merged before), ``unmerged_weight`` the weight without them (None: the same)."""
        raise NotImplementedError

    def unmerged_weight(self, adapter: "LoraAdapter", merged_weight: torch.Tensor, forget: bool = True) -> torch.Tensor:
        """The inverse of ``merged_weight`` (float32, ``(out, in)``); ``forget=False`` keeps what the merge stored
        (DoRA's norm), to compute the weight without merged adapters while they stay merged."""
        raise NotImplementedError

    def merged_bias(self, adapter: "LoraAdapter") -> torch.Tensor:
        """What merging adds to the base bias for ``adapter.lora_bias`` (float32, ``(out,)``), so that the merged
        layer equals the forward. Plain LoRA only: DoRA with a ``lora_bias`` is refused by ``LoraConfig``, as in peft."""
        raise NotImplementedError
