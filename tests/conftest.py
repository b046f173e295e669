"""Shared fixtures and the one dtype -> tolerance table.

Tolerances were measured, not guessed: for each dtype, the gap between the naive reference evaluated in that
dtype and the same reference in float64, on the tiny models used here, with a margin of ~4x. Never loosen an
entry to make a test pass; find out why it differs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests; set before lorakit loads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# dtype -> (rtol, atol) for element-by-element comparisons of activations/logits
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """Element-by-element comparison with the table's tolerance for ``dtype`` (default: ``actual``'s dtype)."""
    rtol, atol = TOLERANCE[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol, msg=msg or None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_llama(seed: int = 0, **overrides):
    """A random Llama with the real transformers classes, small enough for the 2-core CI machine."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    return model


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def embedded_base():
    """A factory of fresh copies of the embedded SmolLM2-135M-Instruct (converted once per machine, ~40 s in CI;
    then ~0.3 s a copy). Use only where a test truly needs the real model."""
    import lorakit

    def make():
        return lorakit.load_base("smollm2-135m", device="cpu")

    make()
    return make
