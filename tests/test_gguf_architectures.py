"""GGUF export beyond Llama: each family is merged, written, and read back with transformers' own GGUF loader
(``from_pretrained(folder, gguf_file=...)``), which undoes exactly what llama.cpp's converter does per architecture
(names, q/k permutation or not, norm offsets). The Llama path is covered in test_merge_export.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit.export import export_merged
from test_serve_support import CHATML, TEXT, make_adapter

IDS = torch.tensor([[3, 17, 42, 99, 150, 7, 250, 31, 64, 1], [5, 6, 7, 8, 9, 10, 11, 12, 13, 300]])
SENTENCE = "Paris is the capital of France 🙂 2024 <|im_start|>user\nhi<|im_end|>"
# transformers' GGUF tokenizer reader (not lorakit's writer) differs before 5.x for some families
TRANSFORMERS_4 = int(__import__("transformers").__version__.split(".")[0]) < 5
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.3)


def qwen_tokenizer():
    """A byte-level BPE with Qwen2's own pre-tokenizer regex (single digits), as Qwen2/2.5/3 ship it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def sentencepiece_tokenizer():
    """A BPE with byte fallback and "▁" for spaces, the shape of Gemma's, Phi-3's and Llama 2's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special + [f"<0x{i:02X}>" for i in range(256)],
                                  show_progress=False)
    tok.train_from_iterator(TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def qwen2(vocab: int, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **{**SHAPE, **overrides}))


def qwen3(vocab: int, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 128 is Qwen3Config's default, and transformers' reader takes it from there (its qwen3 table does not
    # read attention.key_length), so only this head size can be checked by reading back; llama.cpp reads the key.
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, tie_word_embeddings=False, head_dim=128,
                                        **{**SHAPE, **overrides}))


def phi3(vocab: int, **overrides):
    from transformers import Phi3Config, Phi3ForCausalLM

    # the reader does not map phi3's sliding window, so it takes Phi3Config's default (None) as this model does
    return Phi3ForCausalLM(Phi3Config(vocab_size=vocab, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, **{**SHAPE, **overrides}))


def gemma2(vocab: int, **overrides):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # llama.cpp scales queries by 1/sqrt(head_dim) and the reader takes query_pre_attn_scalar from Gemma2Config's
    # default (256), as it does the soft-capping values: only head_dim 256 is checkable by reading back
    shape = {**SHAPE, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
             **overrides}
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape))


def gemma3(vocab: int, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # six layers: five sliding (rope base 10000, window 4 < the 10 test tokens) and one global (base 5e5), the
    # pattern llama.cpp hard-codes; head_dim 256 for the same reason as Gemma 2
    shape = {**SHAPE, "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256,
             "query_pre_attn_scalar": 256, "sliding_window": 4, "rope_theta": 5e5, **overrides}
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape))


# family -> (builder, the class transformers' reader builds, what llama.cpp adds to every RMSNorm weight)
FAMILIES = {"qwen2": (qwen2, "Qwen2ForCausalLM", 0.0), "qwen3": (qwen3, "Qwen3ForCausalLM", 0.0),
            "phi3": (phi3, "Phi3ForCausalLM", 0.0), "gemma2": (gemma2, "Gemma2ForCausalLM", 1.0),
            "gemma3": (gemma3, "Gemma3ForCausalLM", 1.0)}


def _stored(weight: np.ndarray, kind: str, name: str, norm_offset: float) -> np.ndarray:
    """``weight`` as the file stores it and the reader gives it back: norms float32 (as ``(w + offset) - offset``),
    Q8_0 where rows split into blocks of 32, else f16."""
    import gguf

    if "norm" in name:
        return (weight + np.float32(norm_offset)) - np.float32(norm_offset)
    if weight.ndim == 1:
        return weight
    if kind == "q8_0" and weight.shape[-1] % 32 == 0:
        packed = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
        return gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0).reshape(weight.shape)
    return weight.astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def exported(request, tmp_path_factory):
    """One tiny random model of the family with a PEFT-format adapter, merged and written as f16 and q8_0."""
    from transformers import AutoModelForCausalLM

    build, class_name, norm_offset = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    base = build(len(tokenizer)).eval()
    with torch.no_grad():  # biases (Qwen2's q/k/v) and norms start at constants: make every element matter
        for name, parameter in base.named_parameters():
            if name.endswith("bias") or "norm" in name:
                scale = 1.0 - norm_offset if "norm" in name else 0.0  # Gemma's norms multiply by 1 + w
                parameter.copy_(torch.randn_like(parameter) * 0.5 + scale)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter = make_adapter(base, root / "adapter", seed=1, std=0.05)
    out = {"root": root, "base": root / "base", "class": class_name, "norm_offset": norm_offset}
    for kind in ("f16", "q8_0"):
        model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
        lorakit.load_adapter(model, adapter, adapter="x")
        export_merged(model, tokenizer, "x", root / kind, dtype=torch.float32, gguf_type=kind, name="m")
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_transformers_reads_back_the_merged_model(exported, kind):
    """Logits of the file, as transformers reads it, equal the merged model's with the file's rounding applied.

    With the rounding emulated (``_stored``) the weights are the same numbers and the ops the same: measured
    difference exactly 0, so atol 1e-5 only allows for a different summation order; a wrong name, permutation or
    missing bias moves these logits (max |logit| ~9) by O(1). Against the unrounded merged model, f16 rounding
    (2^-11 relative per weight, amplified by these deliberately large random weights, biases and norms) moved the
    logits by 0.47% (qwen2), 0.11% (qwen3), 0.36% (phi3), 0.12% (gemma2) and 0.08% (gemma3) of
    their largest magnitude: the bound is 2% of it. (Q8_0 moves them
    3-8%, as much as a real error could on two layers, so only the emulated comparison is meaningful there.)
    """
    from transformers import AutoModelForCausalLM

    folder = exported[kind]
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"m-{kind}.gguf").eval()
    assert type(from_gguf).__name__ == exported["class"]
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        exact = merged(IDS).logits
        for name, parameter in merged.named_parameters():
            parameter.copy_(torch.from_numpy(_stored(parameter.numpy(), kind, name, exported["norm_offset"])))
        expected = merged(IDS).logits
        actual = from_gguf(IDS).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    if kind == "f16":
        torch.testing.assert_close(actual, exact, rtol=0, atol=0.02 * float(exact.abs().max()))
    assert from_gguf.config.tie_word_embeddings == merged.config.tie_word_embeddings


def test_tokenizer_and_chat_template_round_trip(exported):
    """transformers rebuilds the tokenizer from the file's vocabulary, merges and pre-tokenizer name."""
    import gguf
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(exported["base"])
    # transformers 5.24 drops the template and special tokens when it rebuilds a qwen3 tokenizer (a plain
    # TokenizersBackend), so read the fields llama.cpp uses
    fields = gguf.GGUFReader(exported["f16"] / "m-f16.gguf").fields
    assert fields["tokenizer.chat_template"].contents() == original.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == original.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"].contents() == original.pad_token_id
    try:
        from_gguf = AutoTokenizer.from_pretrained(exported["f16"], gguf_file="m-f16.gguf")
    except (ImportError, AttributeError, TypeError) as error:
        if not TRANSFORMERS_4:
            raise
        # TypeError (4.56 with protobuf installed): its gemma builder makes a Unigram vocabulary from
        # tokenizer.ggml.scores and reads no merges, so this fixture's BPE ("gpt2") vocabulary gives it None scores;
        # a real Gemma (SentencePiece-style "llama") vocabulary round-trips on 4.x
        # (test_sentencepiece_style_vocabulary_round_trips[gemma3])
        pytest.skip(f"transformers 4.x cannot rebuild this family's tokenizer from GGUF ({type(error).__name__}: "
                    "its gemma builder needs protobuf and reads a BPE vocabulary as Unigram scores, its phi3 reader "
                    "has no bos_token_id); 5.x can")
    assert from_gguf(SENTENCE)["input_ids"] == original(SENTENCE)["input_ids"]
    assert from_gguf.decode(original(SENTENCE)["input_ids"]) == SENTENCE


@pytest.mark.parametrize("family", ["phi3", "gemma3"])
def test_sentencepiece_style_vocabulary_round_trips(family, tmp_path):
    """Phi-3 and Gemma ship BPE with byte fallback: written as llama.cpp's "llama" vocabulary (scores in merge order),
    which transformers rebuilds with its per-architecture builder (phi3_tokenizer, gemma_tokenizer)."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = sentencepiece_tokenizer()
    model = FAMILIES[family][0](len(tokenizer), num_hidden_layers=1)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["o_proj"]), adapter="x")
    export_merged(model, tokenizer, "x", tmp_path / "out", gguf_type="f16", name="m")
    assert gguf.GGUFReader(tmp_path / "out" / "m-f16.gguf").fields["tokenizer.ggml.model"].contents() == "llama"
    from_gguf = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="m-f16.gguf")
    for text in ("Paris is the capital of France", "two  spaces 🙂 中文 42 <start_of_turn>user 🚀"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not (TRANSFORMERS_4 and family == "phi3"):  # 4.x's GGUF phi3 builder reads this vocabulary as other ids
            assert from_gguf(text, add_special_tokens=False)["input_ids"] == ids
    assert "<0xF0>" in tokenizer.convert_ids_to_tokens(ids)  # 🚀 is not in the vocabulary: byte fallback was used
    # llama.cpp reads these two to tokenize as this tokenizer does (tests/test_gguf_llamacpp.py runs llama.cpp):
    # no "▁" before the text (only a Prepend normalizer or a prepending Metaspace asks for one), and the <0xNN>
    # tokens are bytes although this tokenizer.json lists them among its special added tokens
    fields = gguf.GGUFReader(tmp_path / "out" / "m-f16.gguf").fields
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<0xF0>")] == gguf.TokenType.BYTE
    assert types[tokenizer.convert_tokens_to_ids("<eos>")] == gguf.TokenType.CONTROL


def test_space_prefix_follows_the_tokenizer():
    """Llama 2's older tokenizer.json prepends "▁" with a normalizer, its newer one with a Metaspace pre-tokenizer;
    Gemma's only replaces spaces."""
    from lorakit.export import _prepends_space

    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    assert _prepends_space({"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, replace]}}) is True
    assert _prepends_space({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}})
    assert not _prepends_space({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never"}})
    assert _prepends_space({"normalizer": replace, "pre_tokenizer": None}) is False


def test_files_name_their_architecture_tensors_and_pre_tokenizer(exported):
    import gguf

    reader = gguf.GGUFReader(exported["f16"] / "m-f16.gguf")
    arch = reader.fields["general.architecture"].contents()
    assert arch == exported["class"].removesuffix("ForCausalLM").lower()
    assert reader.fields["tokenizer.ggml.pre"].contents() == "qwen2"  # llama.cpp picks its digit splitting by this
    names = {t.name for t in reader.tensors}
    if arch == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names and "output.weight" not in names
    elif arch == "gemma2":
        assert {"blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
        assert reader.fields["gemma2.attention.key_length"].contents() == 256
        assert reader.fields["gemma2.final_logit_softcapping"].contents() == 30.0
        assert reader.fields["gemma2.attention.sliding_window"].contents() == 4096
    elif arch == "gemma3":
        assert {"blk.5.attn_q_norm.weight", "blk.5.post_ffw_norm.weight"} <= names
        assert reader.fields["gemma3.rope.freq_base"].contents() == 5e5  # the global layers' base
        assert reader.fields["gemma3.attention.sliding_window"].contents() == 4
    elif arch == "phi3":
        shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # GGUF lists (columns, rows)
        assert shapes["blk.0.attn_qkv.weight"] == (64, 64 + 2 * 2 * 16) and shapes["blk.0.ffn_up.weight"] == (64, 2 * 96)
        assert not any("attn_q." in n or "ffn_gate" in n for n in names)
    else:
        assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "output.weight"} <= names
        assert reader.fields["qwen3.attention.key_length"].contents() == 128


def test_unsupported_families_and_configs_are_refused_in_one_line(tmp_path):
    from transformers import GemmaConfig, GemmaForCausalLM

    model = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="x")
    supported = r"llama, mistral\) and qwen2, qwen3, phi3, gemma2, gemma3_text; this model is 'gemma'"
    with pytest.raises(lorakit.LorakitError, match=supported) as info:
        export_merged(model, None, "x", tmp_path / "out", gguf_type="f16")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    windowed = qwen2(64, use_sliding_window=True, sliding_window=8, num_hidden_layers=1)
    lorakit.inject(windowed, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="x")
    with pytest.raises(lorakit.LorakitError, match="use_sliding_window"):
        export_merged(windowed, None, "x", tmp_path / "out", gguf_type="q8_0")
    partial = phi3(64, num_hidden_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                             "partial_rotary_factor": 0.75})
    if getattr(partial.config, "partial_rotary_factor", 0.75) != 0.75:  # transformers 4.x: a field of its own
        partial = phi3(64, num_hidden_layers=1, partial_rotary_factor=0.75)
    lorakit.inject(partial, lorakit.LoraConfig(r=2, target_modules=["qkv_proj"]), adapter="x")
    with pytest.raises(lorakit.LorakitError, match="partial_rotary_factor=0.75"):
        export_merged(partial, None, "x", tmp_path / "out", gguf_type="f16")
    scaled = gemma2(64, num_hidden_layers=1, query_pre_attn_scalar=64)  # llama.cpp would scale by head_dim 256
    lorakit.inject(scaled, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="x")
    with pytest.raises(lorakit.LorakitError, match="query_pre_attn_scalar=64 but llama.cpp scales queries by 256"):
        export_merged(scaled, None, "x", tmp_path / "out", gguf_type="f16")
    # a rope scaling llama.cpp's gemma3 graph is not given by its converter (yarn; Gemma 3's own linear scaling of the
    # global layers is exported, test_followups_20_gguf.py): refused before any work, not after the merge
    long = gemma3(64, rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6,
                                                          "original_max_position_embeddings": 32},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    lorakit.inject(long, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="x")
    with pytest.raises(lorakit.LorakitError, match="rope type 'yarn' is not supported yet on llama.cpp's gemma3"):
        export_merged(long, None, "x", tmp_path / "out", gguf_type="f16")
    assert "x" in next(m for m in long.modules() if hasattr(m, "adapters")).adapters  # nothing was merged
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out").exists()
