"""Variants are strategy objects: how an adapter initialises, runs forward, and merges into / out of W.

Plain LoRA is one of them, so a layer never asks "is there a variant?". All weights handed to a variant are in
the linear form ``(out_features, in_features)`` and float32 (embeddings are transposed into that form by the layer).
"""

from __future__ import annotations

from lorakit.variants.base import Variant
from lorakit.variants.dora import DoRA, RsDoRA
from lorakit.variants.lora import LoRA, RsLoRA

VARIANTS: dict[str, Variant] = {"lora": LoRA(), "rslora": RsLoRA(), "dora": DoRA(), "rsdora": RsDoRA()}


def get_variant(name: str) -> Variant:
    return VARIANTS[name]


__all__ = ["Variant", "LoRA", "RsLoRA", "DoRA", "RsDoRA", "VARIANTS", "get_variant"]
