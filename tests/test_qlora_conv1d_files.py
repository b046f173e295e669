"""An adapter trained on an NF4 GPT-2 (Conv1D layers) is a file about the dense GPT-2: same base fingerprint and
PEFT's fan_in_fan_out, so it loads on the dense model (lorakit and peft) with the outputs of the dense math."""

import json

import peft
import torch
import transformers

import lorakit
from conftest import assert_close
from test_layers import randomize


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_nf4_gpt2_adapter_is_a_dense_gpt2_file(tmp_path):
    dense = _gpt2()
    quantized = lorakit.quantize(_gpt2(), "nf4")
    assert lorakit.base_fingerprint(quantized) == lorakit.base_fingerprint(dense)
    lorakit.inject(quantized, lorakit.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]))
    randomize(quantized)
    lorakit.save_adapter(quantized, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    lorakit.load_adapter(dense, tmp_path / "a")  # refused before as "made for another base model"
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        ours = dense(ids).logits
        theirs = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "a").eval()(ids).logits
    assert_close(ours, theirs)
