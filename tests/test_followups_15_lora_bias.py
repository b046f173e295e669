"""peft's ``lora_bias=True`` (a trained bias ``b (out,)`` on lora_B: the update is ``s * (B A x + b)``), against the
real peft 0.21 package. Before, lorakit refused such adapters in one line ("PEFT option lora_bias=True is not
supported").

peft's rules, read in peft/tuners/lora/{layer,config}.py and followed here: the bias is scaled with the update;
merging adds ``s * b`` to the base's bias, and a base layer without a bias cannot merge (peft warns at creation and
raises at merge; it creates no bias); DoRA, embeddings and inits other than true/false are refused; LoRA+ puts the
bias in B's group without weight decay (``create_loraplus_optimizer``: "lora_B" in its name, "bias" in its name).
The static decoder (lorakit.decoding) holds no bias: rows on such an adapter are refused there in one line. Mixed
batches on the stacked kernels add each row's bias after the stacked delta.
"""

from __future__ import annotations

import copy
import json
import warnings

import httpx
import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file

import lorakit
from conftest import assert_close
from lorakit.adapter_stack import AdapterStack
from lorakit.errors import LorakitError
from lorakit.inject import lora_layers
from lorakit.optim import param_groups
from test_peft_sweep import build
from test_serve_support import ServerProcess, never_ending, tiny_hf_folder

IDS = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def twins(kind: str, dtype: torch.dtype = torch.float64, seed: int = 1):
    """(lorakit model, peft model) on copies of one tiny base, with equal random A, B and bias (B, b non-zero)."""
    base = build(kind).to(dtype)
    theirs = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn that Llama's bias-free layers cannot merge
        ours = lorakit.inject(base, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS[kind], lora_bias=True))
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind],
                                                             lora_bias=True, init_lora_weights=False,
                                                             fan_in_fan_out=kind == "gpt2"))
    gen = torch.Generator().manual_seed(seed)
    inner = theirs.base_model.model
    with torch.no_grad():
        for path, layer in lora_layers(ours).items():
            mine, module = layer.adapters["default"], inner.get_submodule(path)
            mine.lora_B.copy_(torch.randn(mine.lora_B.shape, generator=gen) * 0.2)
            mine.lora_bias.copy_(torch.randn(mine.lora_bias.shape, generator=gen) * 0.2)
            module.lora_A["default"].weight.copy_(mine.lora_A)
            module.lora_B["default"].weight.copy_(mine.lora_B)
            module.lora_B["default"].bias.copy_(mine.lora_bias)
    return ours, theirs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # GPT-2: Conv1D layers (peft's fan_in_fan_out)
def test_forward_and_gradients_equal_peft(kind):
    ours, theirs = twins(kind)
    mine, peft_out = ours(IDS, labels=IDS), theirs(IDS, labels=IDS)
    assert_close(mine.logits, peft_out.logits)
    mine.loss.backward()
    peft_out.loss.backward()
    inner = theirs.base_model.model
    for path, layer in lora_layers(ours).items():
        adapter, module = layer.adapters["default"], inner.get_submodule(path)
        assert adapter.lora_bias.requires_grad and adapter.lora_bias.grad.abs().max() > 0  # the bias trains
        assert_close(adapter.lora_bias.grad, module.lora_B["default"].bias.grad, msg=path)
        assert_close(adapter.lora_B.grad, module.lora_B["default"].weight.grad, msg=path)
        assert_close(adapter.lora_A.grad, module.lora_A["default"].weight.grad, msg=path)
    with torch.no_grad():  # the bias matters: without it the logits differ
        for layer in lora_layers(ours).values():
            layer.adapters["default"].lora_bias.zero_()
        assert (ours(IDS).logits - peft_out.logits).abs().max() > 1e-3


@pytest.mark.parametrize("config, said", [
    (dict(variant="dora"), "variant='dora'"),
    (dict(init="gaussian"), "init='default'"),
    (dict(target_modules=["embed_tokens"]), "Embedding"),
    (dict(target_modules=None, target_parameters=["mlp.down_proj.weight"]), "target_parameters"),
])
def test_what_peft_refuses_is_refused_in_one_line(config, said):
    with pytest.raises(LorakitError, match=said) as caught:
        lorakit.inject(build("llama"), lorakit.LoraConfig(r=4, lora_bias=True, **{"target_modules": ["q_proj"], **config}))
    assert "\n" not in str(caught.value)
    if "variant" in config or "init" in config:  # peft's LoraConfig refuses the same pairs
        with pytest.raises(ValueError, match="lora_bias"):
            peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True, use_dora="variant" in config,
                            init_lora_weights="gaussian" if "init" in config else True)


def test_merge_and_unmerge_are_exact_and_equal_peft_merge():
    ours, theirs = twins("gpt2")
    before = {k: v.clone() for k, v in ours.state_dict().items() if "adapters" not in k}
    unmerged = ours(IDS).logits
    lorakit.merge(ours)
    layer = lora_layers(ours)["transformer.h.0.attn.c_attn"]
    assert not torch.equal(layer.base_layer.bias, before["transformer.h.0.attn.c_attn.base_layer.bias"])
    assert_close(ours(IDS).logits, unmerged, dtype=torch.float32)  # lorakit forms every merge delta in float32
    lorakit.unmerge(ours)
    after = {k: v for k, v in ours.state_dict().items() if "adapters" not in k}
    # biases restored bit for bit (kept at merge); weights as every unmerge restores them, W' - s B A
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.endswith("bias"))
    assert all(torch.allclose(after[k], v, rtol=0, atol=1e-7) for k, v in before.items())
    assert_close(lorakit.merge_and_unload(ours)(IDS).logits, theirs.merge_and_unload()(IDS).logits, dtype=torch.float32)


def test_a_bias_that_overflows_the_base_dtype_is_refused_by_the_safe_merge():
    ours, _ = twins("gpt2", torch.float32)
    ours.half()
    for host in lora_layers(ours).values():  # a float16 base with float32 adapters, as lorakit trains them
        host.adapters.float()
    layer = lora_layers(ours)["transformer.h.1.mlp.c_proj"]
    with torch.no_grad():
        layer.adapters["default"].lora_bias[3] = 1e6  # s * b beyond float16's 65504; the weights stay finite
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(LorakitError, match="NaN/Inf.*transformer.h.1.mlp.c_proj.*nothing was merged"):
        lorakit.merge(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_a_base_layer_without_a_bias_refuses_the_merge_and_changes_nothing():
    ours, theirs = twins("llama")  # Llama's projections have no bias
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(LorakitError, match="no bias to fold it into.*nothing was merged") as caught:
        lorakit.merge(ours)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    assert not any(layer.merged for layer in lora_layers(ours).values())
    with pytest.raises(RuntimeError, match="no bias"):  # peft refuses it too
        theirs.merge_and_unload()


def test_saved_files_load_both_ways(tmp_path):
    ours, theirs = twins("llama", torch.float32)
    lorakit.save_adapter(ours, tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in saved
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_bias"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours")
    assert_close(loaded(IDS).logits, ours(IDS).logits)

    gpt2, peft_gpt2 = twins("gpt2", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft 0.21 takes its own 1-D lora_B.bias for an unsharded ZeRO-3 tensor
        peft_gpt2.save_pretrained(tmp_path / "peft")
    mine = build("gpt2")
    lorakit.load_adapter(mine, tmp_path / "peft")
    assert_close(mine(IDS).logits, peft_gpt2(IDS).logits)
    assert_close(mine(IDS).logits, gpt2(IDS).logits)

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": False}))
    with pytest.raises(LorakitError, match="is a bias of lora_B, but adapter_config.json has no lora_bias") as caught:
        lorakit.load_adapter(build("gpt2"), tmp_path / "peft")
    assert "\n" not in str(caught.value)


def test_loraplus_puts_the_bias_in_b_group_without_decay_as_peft():
    ours, theirs = twins("llama", torch.float32)
    groups = param_groups(ours, lr=1e-3, weight_decay=0.1, loraplus_ratio=16)
    bias = lora_layers(ours)["model.layers.0.self_attn.q_proj"].adapters["default"].lora_bias
    group = next(g for g in groups if any(p is bias for p in g["params"]))
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.1)
    peft_bias = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].bias
    peft_group = next(g for g in optimizer.param_groups if any(p is peft_bias for p in g["params"]))
    assert (group["lr"], group["weight_decay"]) == (peft_group["lr"], peft_group["weight_decay"]) == (16e-3, 0.0)


def test_mixed_batch_of_a_biased_and_a_plain_adapter_equals_each_alone():
    model = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=TARGETS["llama"], lora_bias=True), adapter="b")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=TARGETS["llama"]), adapter="p")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in lorakit.lora_parameters(model):
            if name.endswith(("lora_B", "lora_bias")):
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.3)
    ids = torch.randint(0, 100, (3, 7), generator=gen)
    alone = {}
    with torch.no_grad():
        for name in ("b", "p"):
            lorakit.set_adapter(model, name)
            alone[name] = model(ids).logits
        with lorakit.disable_adapters(model):
            alone[None] = model(ids).logits
        for names in (["b", "p", None], ["b", "b", "b"], ["p", "b", "p"]):
            with lorakit.mixed_batch(model, names):
                mixed = model(ids).logits
            for row, name in enumerate(names):
                assert_close(mixed[row], alone[name][row], msg=f"{names} row {row}")
    # under the Triton interpreter (as CI runs) the stacked kernels took these batches, and added the biases after
    assert all("_lorakit_stack_cache" in layer.__dict__ for layer in lora_layers(model).values())
    with pytest.raises(LorakitError, match="lora_bias"):  # the stacked kernels hold A and B only
        AdapterStack.from_model(model, ["b"])


def test_combining_a_biased_adapter_is_refused_in_one_line():
    """The combined adapter is built from A and B alone: the bias would be dropped silently."""
    model = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True), adapter="b")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), adapter="p")
    with pytest.raises(LorakitError, match="adapter 'b' has a bias on lora_B") as caught:
        lorakit.combine_adapters(model, {"b": 0.5, "p": 0.5})
    assert "\n" not in str(caught.value) and "combined" not in lorakit.adapter_names(model)


def test_the_static_decoder_path_serves_rows_on_a_biased_adapter():
    """The static decoder adds each row's s b (its stacks hold it since the fifteenth session; tests/
    test_followups_15_lead.py checks its logits): the engine no longer refuses such rows."""
    import threading

    from conftest import tiny_llama
    from lorakit.decoding import StaticDecoder
    from lorakit.serve.engine import Engine

    model = tiny_llama(seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True), adapter="b")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="p")
    engine = Engine(model, threading.RLock(), max_batch=2, decoder=StaticDecoder(model, max_batch=2, max_len=8))
    try:
        assert engine.unservable("b") is None and engine.unservable("p") is None
    finally:
        engine.close()


def test_train_flag_and_inspect(tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.train.config import TrainConfig

    assert TrainConfig(lora_bias=True).lora_config().lora_bias is True
    assert TrainConfig().lora_config().lora_bias is False
    ours, _ = twins("gpt2", torch.float32)
    lorakit.save_adapter(ours, tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    variant = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("variant"))
    assert variant.split(None, 1)[1] == "lora with a bias on lora_B (lora_bias)"
    assert main(["inspect", "--json", str(tmp_path / "adapter")]) == 0
    assert json.loads(capsys.readouterr().out)["lora_bias"] is True


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A CPU server over a tiny Llama and one peft-saved lora_bias adapter (Llama's layers have no bias of their
    own: only the unmerged path can run it), and peft's own greedy answers with and without the bias."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora_bias")
    tiny_hf_folder(root / "model", max_position_embeddings=128)
    never_ending(root / "model")  # answers run to max_tokens, in peft and in the server alike
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_bias=True,
            init_lora_weights=False))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * (1.0 if name.endswith("bias") else 0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft 0.21 takes its own 1-D lora_B.bias for an unsharded ZeRO-3 tensor
        theirs.save_pretrained(root / "adapters" / "biased")
    prompt = list(range(5, 17))
    answers = {}
    theirs.eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        answers["biased"] = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                            min_new_tokens=8)[0, len(prompt):].tolist()
        for name, parameter in theirs.named_parameters():
            if name.endswith("lora_B.default.bias"):
                parameter.zero_()
        answers["unbiased"] = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                              do_sample=False, min_new_tokens=8)[0, len(prompt):].tolist()
    assert answers["biased"] != answers["unbiased"]  # the bias changes the greedy answer
    process = ServerProcess(root / "model", root / "adapters", "--max-tokens", "16", log=root / "server.log")
    try:
        yield process, prompt, answers
    finally:
        process.stop()


def test_serve_answers_with_the_bias_as_peft_generates(served):
    from transformers import AutoTokenizer

    process, prompt, answers = served
    tokenizer = AutoTokenizer.from_pretrained(process.log.parent / "model")
    response = httpx.post(process.url + "/v1/completions", timeout=60, json={
        "model": "biased", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text[:500]
    text = response.json()["choices"][0]["text"]
    assert text == tokenizer.decode(answers["biased"], skip_special_tokens=True)
    assert text != tokenizer.decode(answers["unbiased"], skip_special_tokens=True)
