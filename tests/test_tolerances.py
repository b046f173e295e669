"""The tolerance table stays honest: re-measure the reference's own error per dtype and check the table covers it
with margin (and is not absurdly loose)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import TOLERANCE, tiny_llama
from test_layers import randomize


def measure(dtype: torch.dtype) -> float:
    """Max abs logits error of the adapted tiny Llama in ``dtype`` against float64, over the three variants."""
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for variant in ("lora", "rslora", "dora"):
        reference = tiny_llama().double()
        lorakit.inject(reference, lorakit.LoraConfig(r=4, alpha=8, variant=variant))
        randomize(reference)
        model = tiny_llama().to(dtype)
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant=variant))
        randomize(model)
        worst = max(worst, (model(ids).logits.double() - reference(ids).logits).abs().max().item())
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_table_covers_measured_error_with_margin(dtype):
    error = measure(dtype)
    atol = TOLERANCE[dtype][1]
    assert error * 2 < atol, f"{dtype}: measured {error:.2e}, table atol {atol:.0e} leaves too little margin"
    assert atol < error * 200, f"{dtype}: table atol {atol:.0e} is far looser than the measured {error:.2e}"
