"""Core follow-ups (session 13): one implementation of the call with adapted parameters for LoRA on raw parameters
and on nn.MultiheadAttention (lorakit.param_call), and a trainable-tokens load that writes only the trained rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import assert_close
from lorakit.errors import LorakitError
from lorakit.mha_lora import MhaLora
from test_mha_interop import X, block, randomize
from test_param_lora_replicas import replicate_on_cpu


def attention_model() -> nn.Module:
    """The interop tests' Block (nn.MultiheadAttention, then a Linear) with peft's attention LoRA, B random."""
    model = block()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["attn"]))
    randomize(model)
    return model


def held_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}


def test_attention_lora_in_a_replica_equals_the_model_and_gives_its_copies_back():
    """DataParallel replicas hold in_proj_weight and out_proj.weight as plain attributes: the call reads the adapted
    tensors there and puts the replica's own copies back, in both modules, with no mark of the call left."""
    model = attention_model()
    host = model.attn
    assert isinstance(host, MhaLora)
    with torch.no_grad():
        expected = model(X)
    replica = replicate_on_cpu(model)
    owners = (replica.attn.base_layer, replica.attn.base_layer.out_proj)
    before = [held_tensors(owner) for owner in owners]
    assert {"in_proj_weight"} <= before[0].keys() and {"weight"} <= before[1].keys()
    with torch.no_grad():
        got = replica(X)
    assert_close(got, expected)
    with lorakit.disable_adapters(model), torch.no_grad():
        plain = model(X)
    assert (got - plain).abs().max() > 1e-3  # the adapter acts in the replica
    for owner, held in zip(owners, before):
        after = held_tensors(owner)
        assert after.keys() == held.keys() and all(after[k] is v for k, v in held.items())
        assert not any(k.startswith("_lorakit") for k in vars(owner))
    # the model's own attention reads its registered parameters again
    assert "in_proj_weight" not in vars(host.base_layer) and "weight" not in vars(host.base_layer.out_proj)


def test_nested_call_through_an_attention_wrapper_is_refused_in_a_replica_and_in_the_model():
    """A module that calls its own wrapper again would read the first call's adapted tensors as its parameters (in a
    replica, where they are plain attributes anyway, the delta would be added twice): refused in one line, as for
    ParamLora. Before the one shared implementation, MhaLora let a replica's nested call through."""
    for in_replica in (False, True):
        model = attention_model()
        model = replicate_on_cpu(model) if in_replica else model
        host = model.attn
        attention = host.base_layer
        inner = attention.forward

        def nested(*args, host=host, inner=inner, **kwargs):
            host(*args, **kwargs)
            return inner(*args, **kwargs)

        before = [held_tensors(owner) for owner in (attention, attention.out_proj)]
        attention.forward = nested
        with pytest.raises(LorakitError, match="already replaced during this call") as caught, torch.no_grad():
            model(X)
        assert "\n" not in str(caught.value)
        del attention.forward
        after = [held_tensors(owner) for owner in (attention, attention.out_proj)]
        assert [a.keys() for a in after] == [b.keys() for b in before], in_replica
        assert all(a[k] is v for a, b in zip(after, before) for k, v in b.items())


# -- trainable tokens: the load writes the trained rows into the copies, and nothing the size of the embedding more
BIG = dict(vocab_size=32768, hidden_size=512, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=32)  # embedding: 64 MiB float32
TOKEN_ROWS = [3, 700, 32767]


def _big_llama() -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**BIG)).eval()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Set this process's peak resident size (VmHWM) to its current one (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return _rss_kib("VmHWM") <= _rss_kib("VmRSS") + 1024


def test_trainable_tokens_load_peaks_at_what_the_adapter_holds(tmp_path):
    """peft's trainable_token_indices load as copies of the (tied) embedding and head, each with the trained rows.
    The load made a whole (vocab, dim) weight with those rows first and copied it into each copy: the peak stood one
    embedding above what the adapter holds (64 MiB here). Now each copy (the base's values already) gets only its
    rows, so the peak is what the adapter holds, and the rows and the rest are still exactly right."""
    import gc
    import warnings

    import peft

    from lorakit.adapters import delete_adapter

    if not _reset_peak():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak resident size")
    theirs = peft.get_peft_model(_big_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                               trainable_token_indices=TOKEN_ROWS))
    trained = 0.5 * torch.randn(len(TOKEN_ROWS), BIG["hidden_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.copy_(trained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's note on tied embeddings
        theirs.save_pretrained(tmp_path / "tok")
    del theirs
    model = _big_llama()
    base = model.model.embed_tokens.weight.detach().clone()
    embedding_kib = base.numel() * base.element_size() // 1024
    lorakit.load_adapter(model, tmp_path / "tok", adapter="warm")  # imports and first-use allocations, out of the way
    delete_adapter(model, "warm")
    gc.collect()

    assert _reset_peak()
    before = _rss_kib("VmRSS")
    lorakit.load_adapter(model, tmp_path / "tok")
    peak = _rss_kib("VmHWM") - before

    copies = [model.model.embed_tokens.copies["default"], model.lm_head.copies["default"]]
    held_kib = sum(c.weight.numel() * c.weight.element_size() for c in copies) // 1024  # one embedding each
    assert held_kib == 2 * embedding_kib
    assert peak < held_kib + embedding_kib // 4, (peak, held_kib, embedding_kib)
    rows = torch.tensor(TOKEN_ROWS)
    others = torch.ones(len(base), dtype=torch.bool)
    others[rows] = False
    for copy in copies:
        assert torch.equal(copy.weight[rows], trained)
        assert torch.equal(copy.weight[others], base[others])


# -- one held_prefix for stop strings, reasoning ends and tool-call starts (three copies before) ---------------------
def test_held_prefix_is_the_longest_tail_that_could_still_grow_into_the_marker():
    from lorakit.serve.text import TextAssembler, held_prefix

    assert held_prefix("the answer</th", "</think>") == 4
    assert held_prefix("x <", "<tool_call>") == 1
    assert held_prefix("xaba", "abac") == 3  # "aba" (the shorter "a" fits too: the longest counts)
    assert held_prefix("</think>", "</think>") == 0  # the whole marker is not a prefix that can grow: found, not held
    assert held_prefix("", "</think>") == held_prefix("abc", "") == held_prefix("abc", "x") == 0

    class Letters:  # a tokenizer whose ids are characters
        def decode(self, ids, **kwargs):
            return "".join(chr(i) for i in ids)

    stream = TextAssembler(Letters(), stops=["END", "STOP"], stop_token_ids=())
    shown = "".join(stream.add(ord(c)) for c in "a S")
    assert shown == "a "  # "S" may begin STOP: held back
    assert stream.add(ord("T")) == "" and stream.add(ord("x")) == "STx"
    assert stream.add(ord("E")) == "" and stream.add(ord("N")) == "" and stream.add(ord("D")) == ""
    assert stream.stopped and stream.finish() == ""
