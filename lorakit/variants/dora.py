"""DoRA (Liu et al. 2024): weight-decomposed LoRA, ``W' = m * (W + s B A) / ||W + s B A||``.

The norm is taken per output feature (over the input dimension, PEFT's convention) and detached from the graph,
as the paper recommends, so the backward pass stays as cheap as LoRA's. The magnitude ``m`` starts as the norms of
W, so the adapted layer starts equal to the base. A norm of zero (a zero row in W) is clamped to a tiny epsilon so
the output stays finite (the row's magnitude is then zero too, so it contributes nothing).

Forward, with ``r = m / ||W + s B A||`` (shape ``(out,)``): ``y = base_out + (r - 1) * h + r * s * x A^T B^T``, PEFT's
formula, where ``h`` is ``base_out`` without the bias (``x W^T`` for a lone adapter) when no dropout is active, and
``dropout(x) W^T`` (the same dropout as the low-rank path) when it is, as in PEFT. ``W`` here is the base weight
without any merged adapter (``LoraLayer.unmerged_linear_weight``). So a DoRA adapter active after other adapters
(``set_adapter(model, ["a", "b"])``) scales their output too, ``y - bias = r * (x (W + delta_a) + s x A^T B^T)``,
exactly what merging a then b gives (and PEFT's forward and merge give): ``h = x W^T`` there made the unmerged
forward a sum of independent updates, which its merge changed (by ~100% of the layer's output on random adapters).

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

    def forward(self, adapter, x, base_out, base_weight, base_bias=None):
        weight = base_weight().to(adapter.lora_A.dtype)  # (out, in), without merged adapters
        with torch.no_grad():
            norm = self._norm(adapter, weight).clamp_min(NORM_EPS)  # detached, as in the paper
        ratio = adapter.magnitude / norm  # (out,)
        if isinstance(adapter.dropout, torch.nn.Identity) or not adapter.training:
            # PEFT's rule: the output so far, bias removed (x W^T alone, or with the adapters active before this one)
            x_drop, bias_free = x, base_out if base_bias is None else base_out - base_bias
        else:  # the dropped input's x W^T, as the low-rank path sees it
            x_drop = adapter.dropout(x)
            bias_free = torch.nn.functional.linear(x_drop.to(weight.dtype), weight)
        low_rank = LF.lora_delta_output(x_drop, adapter.lora_A, adapter.lora_B, adapter.scaling, weight.dtype)
        delta = (ratio - 1) * bias_free + ratio * low_rank
        return base_out + delta.to(base_out.dtype)

    def embedding_forward(self, adapter, low_rank, base_out, base_rows, base_weight):
        weight = base_weight().to(adapter.lora_A.dtype)  # (dim, num_embeddings), without merged adapters
        with torch.no_grad():
            norm = self._norm(adapter, weight).clamp_min(NORM_EPS)  # (dim,), detached as in the linear case
        ratio = adapter.magnitude / norm  # (dim,)
        # the rows so far (E[ids] alone, or with the adapters active before this one), as in PEFT and the merge
        delta = (ratio - 1) * base_out + ratio * low_rank
        return base_out + delta.to(base_out.dtype)

    def merged_weight(self, adapter, base_weight: torch.Tensor, unmerged_weight: torch.Tensor | None = None
                      ) -> torch.Tensor:
        delta = LF.delta_weight(adapter.lora_A, adapter.lora_B, adapter.scaling)
        # the norm the forward divides by: of the weight without the adapters merged before this one (peft's merge too)
        norm_of = base_weight if unmerged_weight is None else unmerged_weight
        norm = torch.linalg.vector_norm(norm_of + delta, dim=1).clamp_min(NORM_EPS)
        adapter.merge_norm = norm  # kept (not saved) so that unmerge can invert the normalisation
        return (base_weight + delta) * (adapter.magnitude.detach().float() / norm).unsqueeze(1)

    def unmerged_weight(self, adapter, merged_weight: torch.Tensor, forget: bool = True) -> torch.Tensor:
        norm = getattr(adapter, "merge_norm", None)
        if norm is None:
            raise RuntimeError("DoRA unmerge without a preceding merge")
        magnitude = adapter.magnitude.detach().float()
        scale = torch.where(magnitude != 0, norm / magnitude, torch.zeros_like(norm))
        if forget:
            adapter.merge_norm = None
        return merged_weight * scale.unsqueeze(1) - LF.delta_weight(adapter.lora_A, adapter.lora_B, adapter.scaling)


class RsDoRA(DoRA):
    """DoRA with rsLoRA's scaling ``alpha / sqrt(r)`` (PEFT: ``use_dora=True`` with ``use_rslora=True``)."""

    name = "rsdora"

    def scaling(self, rank: int, alpha: float) -> float:
        return LF.scaling("rslora", rank, alpha)
