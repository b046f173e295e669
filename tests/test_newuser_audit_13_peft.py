"""Adapters saved by the real peft package (0.21) with LoraConfig options the other peft tests leave out, and hostile
adapter folders (audit 13): each defect found is a regression test here; the options that already agreed are
checked once in ``test_more_peft_options_both_ways`` so they stay that way.

Each round trip (``test_peft_sweep.round_trip``): peft builds the adapter on a tiny random model with random non-zero
weights; lorakit loads the saved folder into a fresh base (peft's logits), saves it back for peft (same logits) and
merges (same logits, and peft's merge_and_unload's where peft's merge is right).
"""

from __future__ import annotations


import peft
import pytest
import torch
import transformers as tf

import lorakit
from conftest import assert_close
from test_peft_sweep import SMALL, round_trip

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 99], [2, 4, 8, 16, 32, 63, 98]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def gemma3() -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **SMALL)).eval()


# -- modules_to_save of a tied embedding or head with ensure_weight_tying -------------------------------------------
@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_a_trained_copy_of_a_tied_embedding_with_ensure_weight_tying(saved, tmp_path):
    """peft's ensure_weight_tying on a tied model with modules_to_save naming the embedding or the head: peft trains
    one copy, used by both (it rewrites ["lm_head"] as ["model.embed_tokens"]), and saves it twice, as the
    embedding's and as lm_head.weight. lorakit refused the head's as "a full copy of lm_head.weight (peft's
    save_embedding_layers) that differs from this model's". (peft's own merge_and_unload is not compared: it is off
    on tied weights.)"""
    round_trip("llama-tied", tmp_path, target_modules=["q_proj"], modules_to_save=saved, ensure_weight_tying=True,
               peft_merge_ok=False)


def test_a_trained_copy_of_gemma3s_scaled_tied_embedding(tmp_path):
    """The same on Gemma 3, whose embedding scales its output (Gemma3TextScaledWordEmbedding) and whose head is tied."""
    theirs = peft.get_peft_model(gemma3(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                           ensure_weight_tying=True)).eval()
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(0.05 * torch.randn(100, 32))
    theirs.save_pretrained(tmp_path)
    ours = gemma3()
    lorakit.load_adapter(ours, tmp_path)
    assert_close(logits(ours), logits(theirs))
    assert (logits(ours) - logits(gemma3())).abs().max() > 1e-2
