"""The merged GGUF files run in llama.cpp itself (through llama-cpp-python), not only in transformers' GGUF reader.

transformers' reader (test_gguf_architectures.py) undoes what llama.cpp's converter does, but it is not the program
users run. Here llama.cpp tokenizes the test sentence and evaluates the file: its ids must equal the Hugging Face
tokenizer's and its logits the merged model's. llama-cpp-python is an optional, compiled dependency (its wheel
builds llama.cpp from source, minutes on 2 cores), so CI skips this file; the last local run is recorded in
docs/PERFORMANCE.md ("GGUF in llama.cpp")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.export import export_merged
from test_gguf_architectures import SENTENCE, SHAPE, gemma2, gemma3, phi3, qwen2, qwen_tokenizer, sentencepiece_tokenizer
from test_serve_support import make_adapter

llama_cpp = pytest.importorskip("llama_cpp")
PROMPT = "Paris is the capital of France 2024"


def llama(vocab: int, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **{**SHAPE, **overrides}))


def mistral(vocab: int, **overrides):
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(vocab_size=vocab, sliding_window=None, **{**SHAPE, **overrides}))


def qwen3(vocab: int, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, tie_word_embeddings=False, **{**SHAPE, "head_dim": 32,
                                                                                      **overrides}))


def llama2_tokenizer():
    """The SentencePiece-style BPE of Llama 2 / Mistral v0.1: a "▁" goes before the text (a Prepend normalizer)."""
    from tokenizers import normalizers

    tokenizer = sentencepiece_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                                   normalizers.Replace(" ", "\u2581")])
    return tokenizer


# family -> (builder, tokenizer); the head sizes here are llama.cpp's to read (attention.key_length), so they need
# not be the 128 / 256 the transformers reader assumes
FAMILIES = {
    "llama": (llama, qwen_tokenizer), "llama2": (llama, llama2_tokenizer), "mistral": (mistral, sentencepiece_tokenizer), "qwen2": (qwen2, qwen_tokenizer),
    "qwen3": (qwen3, qwen_tokenizer), "phi3": (phi3, sentencepiece_tokenizer),
    "gemma2": (gemma2, sentencepiece_tokenizer), "gemma3": (gemma3, sentencepiece_tokenizer),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    build, make_tokenizer = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = build(len(tokenizer)).eval()
    with torch.no_grad():  # biases and norms start at constants: make every element matter
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.3 + (0.0 if "gemma" in request.param else 1.0))
    adapter = make_adapter(model, root / "adapter", seed=1, std=0.05)
    lorakit.load_adapter(model, adapter, adapter="x")
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the model with its adapter active computes what the merged file must
        expected = model(torch.tensor([ids])).logits[0].numpy()
    export_merged(model, tokenizer, "x", root / "out", dtype=torch.float32, gguf_type="f16", name="m")
    return {"family": request.param, "tokenizer": tokenizer, "ids": ids, "expected": expected,
            "gguf": root / "out" / "m-f16.gguf"}


def _llama(path, n_ctx: int = 64):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, seed=0)


def test_llama_cpp_tokenizes_like_the_tokenizer(exported):
    llm = _llama(exported["gguf"])
    ids = exported["tokenizer"](SENTENCE, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(SENTENCE.encode(), add_bos=False, special=True) == ids
    text = llm.detokenize(ids, special=True).decode()
    prepends = exported["family"] == "llama2"  # llama.cpp keeps the "▁" that Llama 2's tokenizer put first
    assert text == (" " + SENTENCE if prepends else SENTENCE)


def test_llama_cpp_logits_equal_the_merged_model(exported):
    """Logits llama.cpp computes from the f16 file against the merged float32 model. f16 weights and llama.cpp's
    own kernels differ from PyTorch's float32 in rounding only: the bound is 3% of the largest logit, where a wrong
    tensor name, q/k permutation, norm offset, rope type or head size moves them by O(1) (tens of percent)."""
    ids, expected = exported["ids"], exported["expected"]
    llm = _llama(exported["gguf"])
    llm.eval(ids)
    actual = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    scale = float(np.abs(expected).max())
    error = float(np.abs(actual - expected).max())
    print(f"{exported['family']}: max |llama.cpp - merged| = {error:.4f} of max |logit| {scale:.2f}")
    assert error <= 0.03 * scale, (exported["family"], error, scale)
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_the_embedded_model_merged_runs_in_llama_cpp(tmp_path):
    """SmolLM2-135M-Instruct with a trained-shape adapter, merged to f16 and q8_0: llama.cpp tokenizes its chat
    prompt as transformers does and computes the merged model's logits (f16: rounding only; q8_0: the same
    greedy tokens, its 8-bit weights move logits by a few percent)."""
    from lorakit.generation import encode_prompt

    model, tokenizer = lorakit.load_base("smollm2-135m")
    make_adapter(model, tmp_path / "adapter", seed=2, std=0.02)
    lorakit.load_adapter(model, tmp_path / "adapter", adapter="x")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Two lattes to Berlin on Friday."}],
                                           tokenize=False, add_generation_prompt=True)
    ids = list(encode_prompt(tokenizer, "Two lattes to Berlin on Friday."))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()
    export_merged(model, tokenizer, "x", tmp_path / "out", dtype=torch.float32, gguf_type="f16", name="m")
    llm = _llama(tmp_path / "out" / "m-f16.gguf", n_ctx=128)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    actual = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    scale, error = float(np.abs(expected).max()), float(np.abs(actual - expected).max())
    print(f"smollm2 f16: max |llama.cpp - merged| = {error:.4f} of max |logit| {scale:.2f}")
    assert error <= 0.03 * scale
    model, tokenizer = lorakit.load_base("smollm2-135m")
    lorakit.load_adapter(model, tmp_path / "adapter", adapter="x")
    export_merged(model, tokenizer, "x", tmp_path / "q8", dtype=torch.float32, gguf_type="q8_0", name="m")
    q8 = _llama(tmp_path / "q8" / "m-q8_0.gguf", n_ctx=128)
    q8.eval(ids)
    quantized = np.asarray(q8.scores[: len(ids)], dtype=np.float32)
    print(f"smollm2 q8_0: max |llama.cpp - merged| = {float(np.abs(quantized - expected).max()):.4f}")
    assert (quantized.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
