"""GGUF export of Llama 3.1-style rotary scaling (rope_type "llama3"): the file carries llama.cpp's ``rope_freqs``.

Llama 3.1 / 3.2 / 3.3 divide their low rotary frequencies by ``factor`` (and blend a middle band); llama.cpp reads
this as one tensor, ``rope_freqs.weight``, of per-frequency divisors (its converter's ``generate_extra_tensors``).
Before, ``lorakit merge --format gguf`` refused every such base. The CPU tests read the written tensor back with the
``gguf`` package and hold it against transformers' own llama3 init; the llama.cpp test (skipped when llama-cpp-python
is absent) runs the file at positions past the low-frequency wavelength, where the divisors move the logits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.export import export_merged, gguf_arch
from test_gguf_architectures import SHAPE, qwen2, qwen_tokenizer
from test_serve_support import make_adapter

# wavelengths 2*pi*10000^(2i/32) of a 32-wide head: 6.3, 11.2 stay (under 64 / 4), 19.9, 35.3, 62.8 blend, 112 and up
# are divided by 8 (over 64 / 1): every branch of the scaling is exercised
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def llama3_model(vocab: int, rope: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, rope_parameters=dict(rope or LLAMA3),
                         **{**SHAPE, "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2})
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A tiny llama3-rope Llama with an adapter, merged to an f16 GGUF the way `lorakit merge --format gguf` does."""
    root = tmp_path_factory.mktemp("llama3")
    tokenizer = qwen_tokenizer()
    model = llama3_model(len(tokenizer))
    lorakit.load_adapter(model, make_adapter(model, root / "adapter", seed=1, std=0.05), adapter="x")
    ids = torch.randint(3, len(tokenizer), (200,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    export_merged(model, tokenizer, "x", root / "out", dtype=torch.float32, gguf_type="f16", name="m")
    return {"model": model, "ids": ids, "expected": expected, "gguf": root / "out" / "m-f16.gguf"}


def test_rope_freqs_are_transformers_llama3_ratio(merged):
    """The written divisors equal default_inv_freq / llama3_inv_freq as transformers computes both (float32
    rounding of that quotient only), and the model's own rotary buffer is the llama3 one."""
    import gguf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = merged["model"].config
    llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    default, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    assert torch.equal(merged["model"].model.rotary_emb.inv_freq.cpu(), llama3)
    expected = (default / llama3).numpy()

    tensors = {t.name: t for t in gguf.GGUFReader(str(merged["gguf"])).tensors}
    freqs = tensors["rope_freqs.weight"]
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32
    written = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
    assert written.shape == (config.head_dim // 2,) == (16,)
    np.testing.assert_allclose(written, expected, rtol=2.5e-7, atol=0)  # 2 float32 ulps: the quotient rounds
    # kept (1), blended (strictly between) and divided (8) frequencies, in the same places as transformers'
    assert (written[:2] == 1.0).all() and ((written[2:5] > 1.0) & (written[2:5] < 8.0)).all()
    assert (written[5:] == 8.0).all() and (expected[:2] == 1.0).all() and (expected[5:] == 8.0).all()
    assert "blk.0.attn_q.weight" in tensors  # the rest of the model is there too


def test_other_rope_types_are_still_refused_in_one_line():
    """llama3's rope_freqs is written for llama.cpp's llama graph only (qwen2's reads none); dynamic NTK has no
    llama.cpp rope at all (linear and yarn are exported since test_followups_20_gguf.py)."""
    tokenizer_vocab = 360
    dynamic = llama3_model(tokenizer_vocab, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(LorakitError, match="rope type 'dynamic' .* has no llama.cpp equivalent") as info:
        gguf_arch(dynamic.config)
    assert "\n" not in str(info.value)
    qwen = qwen2(tokenizer_vocab, rope_parameters=dict(LLAMA3))
    with pytest.raises(LorakitError, match="rope type 'llama3' is not supported yet"):
        gguf_arch(qwen.config)


def test_llama_cpp_runs_the_llama3_file_as_transformers(merged):
    """llama.cpp's logits from the f16 file equal the merged model's over 200 positions (past the 64-token
    original context, where the divided low frequencies have turned less than the default ones would), while the
    same weights under default rope differ from them by far more. The bound is f16's own: this small random model
    (weights of std 0.3) amplifies rounding, so the error of transformers itself with the weights rounded to f16
    (1.2 of 13.9 here; llama.cpp's is 0.45, and 0.29 for the same model with default rope) bounds llama.cpp's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import LlamaForCausalLM

    ids, expected = merged["ids"], merged["expected"]
    llm = llama_cpp.Llama(model_path=str(merged["gguf"]), n_ctx=256, logits_all=True, verbose=False, n_threads=1,
                          seed=0)
    llm.eval(ids)
    actual = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    scale = float(np.abs(expected).max())
    error = float(np.abs(actual - expected).max())
    with torch.no_grad():  # the same merged weights rounded to f16, run by transformers in float32
        rounded = copy.deepcopy(merged["model"]).half().float()(torch.tensor([ids])).logits[0].numpy()
    f16_error = float(np.abs(rounded - expected).max())
    print(f"llama3 rope: max |llama.cpp - merged| = {error:.4f}, f16-rounded weights in transformers {f16_error:.4f}, "
          f"of max |logit| {scale:.2f}")
    assert error <= f16_error, (error, f16_error, scale)
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() >= 0.9

    plain_config = merged["model"].config.to_dict()
    plain_config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    plain = LlamaForCausalLM(type(merged["model"].config).from_dict(plain_config)).eval()
    plain.load_state_dict(merged["model"].state_dict())  # export_merged merged the adapter into it
    with torch.no_grad():
        unscaled = plain(torch.tensor([ids])).logits[0].numpy()
    late = slice(64, None)  # where the rope factors matter
    assert float(np.abs(unscaled[late] - expected[late]).max()) > 10 * f16_error
