"""Other models' folders: PEFT files both ways and merge on several transformers architectures (tiny, random)."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from conftest import assert_close
from test_layers import randomize

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def build(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":  # Conv1D layers, fused qkv
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                                bos_token_id=0, eos_token_id=0)).eval()
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **SMALL)).eval()
    if kind == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **SMALL)).eval()
    if kind == "phi":  # biases, dense/fc1/fc2 names
        return tf.PhiForCausalLM(tf.PhiConfig(**SMALL)).eval()
    if kind == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                              num_attention_heads=4, word_embed_proj_dim=32)).eval()
    raise AssertionError(kind)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "gemma", "phi", "opt"])
def test_files_both_ways_and_merge(kind, variant, tmp_path):
    ids = torch.randint(0, 100, (2, 7))
    model = build(kind)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant=variant))
    randomize(model)
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
    assert_close(theirs(ids).logits, expected)

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=variant == "dora", init_lora_weights=False)
    peft_model = peft.get_peft_model(build(kind), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = build(kind)
    lorakit.load_adapter(loaded, tmp_path / "peft")
    reference = peft_model(ids).logits
    assert_close(loaded(ids).logits, reference)
    lorakit.merge(loaded)
    assert_close(loaded(ids).logits, reference)


def test_mixed_batch_on_a_model_that_flattens_rows():
    """OPT reshapes (B, T, H) to (B * T, H) before its MLP: a mixed batch still routes each row's tokens through
    its own adapter, equal to running each row alone with its adapter active."""
    model = build("opt")
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter=name)
    randomize(model)
    ids = torch.randint(0, 100, (3, 5))
    names = ["a", None, "b"]
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        mixed = model(ids).logits
    for row, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lorakit.disable_adapters(model):
                    alone = model(ids[row:row + 1]).logits
            else:
                lorakit.set_adapter(model, name)
                alone = model(ids[row:row + 1]).logits
        assert_close(mixed[row:row + 1], alone)
    assert not torch.allclose(mixed[0], mixed[2])  # the two adapters really differ
