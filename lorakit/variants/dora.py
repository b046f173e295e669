"""DoRA (Liu et al. 2024): weight-decomposed LoRA, ``W' = m * (W + s B A) / ||W + s B A||``.

The norm is taken per output feature (over the input dimension, PEFT's convention) and detached from the graph,
as the paper recommends, so the backward pass stays as cheap as LoRA's. The magnitude ``m`` starts as the norms of
W, so the adapted layer starts equal to the base. A norm of zero (a zero row in W) is clamped to a tiny epsilon so
the output stays finite (the row's magnitude is then zero too, so it contributes nothing).

Forward, with ``r = m / ||W + s B A||`` (shape ``(out,)``) and the base output ``x W^T`` (bias removed):
``y = base_out + (r - 1) * (x W^T) + r * s * x A^T B^T``, PEFT's formula, exact for dropout 0.

Embeddings (PEFT's ``DoraEmbeddingLayer``) use the same formula on the linear form ``W = E^T (dim, num_embeddings)``:
the norm is per embedding dimension, over the vocabulary, and ``x W^T`` becomes the row lookup ``E[ids]``:
``y = E[ids] + (r - 1) * E[ids] + r * s * A^T[ids] B^T`` (times the layer's ``embed_scale`` where it has one).
"""

from __future__ import annotations

import torch

from lorakit import functional as LF
from lorakit.variants.base import Variant

NORM_EPS = 1e-12


class DoRA(Variant):
    name = "dora"

    def init_extra(self, adapter, base_weight: torch.Tensor) -> None:
        with torch.no_grad():
            norm = self._norm(adapter, base_weight.to(adapter.lora_A.dtype))
        adapter.magnitude = torch.nn.Parameter(norm.clone(), requires_grad=adapter.lora_A.requires_grad)

    def _norm(self, adapter, base_weight: torch.Tensor) -> torch.Tensor:
        """``||W + s B A||`` per output feature ``(out,)``, in ``base_weight``'s dtype (the adapter's, in forward).

        The update is formed in that dtype too: ``LF.delta_weight`` (float32, for merging) rounded a float64 model's
        norm, so its gradients differed from peft's by ~1e-7."""
        dtype = base_weight.dtype
        delta = (adapter.lora_B.detach().to(dtype) @ adapter.lora_A.detach().to(dtype)) * adapter.scaling
        return torch.linalg.vector_norm(base_weight + delta, dim=1)

    def forward(self, adapter, x, base_out, base_weight):
        weight = base_weight().to(adapter.lora_A.dtype)  # (out, in)
        with torch.no_grad():
            norm = self._norm(adapter, weight).clamp_min(NORM_EPS)  # detached, as in the paper
        ratio = adapter.magnitude / norm  # (out,)
        x_drop = adapter.dropout(x)
        bias_free = torch.nn.functional.linear(x_drop.to(weight.dtype), weight)  # x W^T without the bias
        low_rank = LF.lora_delta_output(x_drop, adapter.lora_A, adapter.lora_B, adapter.scaling, weight.dtype)
        delta = (ratio - 1) * bias_free + ratio * low_rank
        return base_out + delta.to(base_out.dtype)

    def embedding_forward(self, adapter, low_rank, base_out, base_rows, base_weight):
        weight = base_weight().to(adapter.lora_A.dtype)  # (dim, num_embeddings)
        with torch.no_grad():
            norm = self._norm(adapter, weight).clamp_min(NORM_EPS)  # (dim,), detached as in the linear case
        ratio = adapter.magnitude / norm  # (dim,)
        delta = (ratio - 1) * base_rows().to(ratio.dtype) + ratio * low_rank
        return base_out + delta.to(base_out.dtype)

    def merged_weight(self, adapter, base_weight: torch.Tensor) -> torch.Tensor:
        adapted = base_weight + LF.delta_weight(adapter.lora_A, adapter.lora_B, adapter.scaling)
        norm = torch.linalg.vector_norm(adapted, dim=1).clamp_min(NORM_EPS)
        adapter.merge_norm = norm  # kept (not saved) so that unmerge can invert the normalisation
        return adapted * (adapter.magnitude.detach().float() / norm).unsqueeze(1)

    def unmerged_weight(self, adapter, merged_weight: torch.Tensor) -> torch.Tensor:
        norm = getattr(adapter, "merge_norm", None)
        if norm is None:
            raise RuntimeError("DoRA unmerge without a preceding merge")
        magnitude = adapter.magnitude.detach().float()
        scale = torch.where(magnitude != 0, norm / magnitude, torch.zeros_like(norm))
        adapter.merge_norm = None
        return merged_weight * scale.unsqueeze(1) - LF.delta_weight(adapter.lora_A, adapter.lora_B, adapter.scaling)


class RsDoRA(DoRA):
    """DoRA with rsLoRA's scaling ``alpha / sqrt(r)`` (PEFT: ``use_dora=True`` with ``use_rslora=True``)."""

    name = "rsdora"

    def scaling(self, rank: int, alpha: float) -> float:
        return LF.scaling("rslora", rank, alpha)
