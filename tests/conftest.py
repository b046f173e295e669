"""Shared fixtures and the one dtype -> tolerance table.

Tolerances come from measurement, not from making tests pass: the tiny Llama below with LoRA/rsLoRA/DoRA adapters
(random non-zero B), run in each dtype and compared with the same model in float64 (2026-11-29, CPU, torch 2.13;
script: the "measure" block in tests/test_tolerances.py):
    float32  logits max abs error 6.6e-07   merge+unmerge max weight change 4.5e-08
    float16  logits max abs error 2.6e-03   merge+unmerge max weight change 2.4e-04
    bfloat16 logits max abs error 1.6e-02   merge+unmerge max weight change 2.0e-03
Each entry sits ~4x or more above its measurement. Never loosen one to make a test pass; find out why it differs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests; set before lorakit loads
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite on two pytest-xdist workers, one per core: one torch thread each (two each would
    # oversubscribe the cores), and the same for every process a test starts
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import signal

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and lorakit rightly leaves an
# ignored SIGINT alone (lorakit/train/stopping.py); the Ctrl-C tests (test_followups_17_stop) need a terminal's, in this
# process and in the CLIs they start (which inherit the disposition).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# dtype -> (rtol, atol) for element-by-element comparisons of activations/logits
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 6e-2),
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


@pytest.fixture
def no_dynamo():
    """bitsandbytes' pure-PyTorch dequantize is wrapped in torch.compile; eager is exact and much faster here."""
    import torch._dynamo

    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = previous
