"""Fourteenth audit, as a demanding new user: merging, exporting and combining adapters (lorakit.merge,
lorakit.export, lorakit.combine and the ``lorakit merge`` / ``lorakit combine`` commands). Each test failed before
its fix. Tiny random models built from config classes; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import TOLERANCE, assert_close, tiny_llama
from model_helpers import logits
from test_serve_support import make_adapter, tiny_hf_folder


def test_exporting_one_adapter_takes_its_own_modules_to_save_copy_not_the_active_adapters(tmp_path):
    """export_merged(model, tok, "a", out) while adapter "b" is active wrote b's choice of lm_head (here: the
    base's, b has no copy) beside a's merged LoRA: merge_and_unload picked modules-to-save copies by the active
    adapters, not by the adapters it was asked to merge."""
    from transformers import AutoModelForCausalLM

    from lorakit.export import export_merged

    base = tiny_llama(seed=4, initializer_range=0.3)
    with_head = make_adapter(base, tmp_path / "a", seed=5, std=0.1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    other = make_adapter(base, tmp_path / "b", seed=6, std=0.1, target_modules=["v_proj"])
    lorakit.load_adapter(base, with_head, adapter="a")
    with torch.no_grad():  # a trained copy that differs from the base head
        head = base.lm_head.copies["a"].weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)))
    # fixed ids (they came from the global generator, so the suite's order picked them): some drew a logit whose
    # merged value differed by 1.15e-5, just past float32's 1e-5 (this head's logits are ~10x the table's)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = logits(base, ids)
    lorakit.load_adapter(base, other, adapter="b")  # now the active adapter
    assert lorakit.active_adapters(base) == ["b"]
    export_merged(base, None, "a", tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    # the float32 tolerance of the shared table, for logits of its measurement's scale (about 1), scaled to these:
    # the trained head makes them up to ~21, and merging's float32 rounding grows with them (measured 1.9e-5); the
    # wrong head this guards against moves them by O(1)
    rtol, atol = TOLERANCE[torch.float32]
    torch.testing.assert_close(logits(merged, ids), expected, rtol=rtol, atol=atol * float(expected.abs().max()))


def test_export_with_overwrite_never_replaces_the_folder_the_base_was_loaded_from(tmp_path):
    """export_merged(model, tok, "a", model_dir, overwrite=True) replaced the base folder by the merged model (the
    CLI protects --model, the Python API did not): the base's weights were gone."""
    from lorakit.export import export_merged

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.3)
    model, tokenizer = lorakit.load_base(str(model_dir), dtype=torch.float32, device="cpu")
    adapter = make_adapter(model, tmp_path / "adapter", seed=1, std=0.05)
    lorakit.load_adapter(model, adapter, adapter="a")
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for out in (model_dir, model_dir / "merged"):
        with pytest.raises(lorakit.LorakitError, match="the folder the model was loaded from"):
            export_merged(model, tokenizer, "a", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "model"]  # no temporary folder left
    assert lorakit.adapter_names(model) == ["a"]  # refused before anything was merged


def test_merge_writes_the_tokenizer_saved_in_the_adapter_folder(tmp_path, capsys):
    """transformers' Trainer and trl save the tokenizer beside the adapter; a run that changed the chat template
    trained on that one, but lorakit merge wrote the base's tokenizer, so the merged model was prompted with a
    template it never saw. One whose tokens the model has no rows for is refused in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.cli import main

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.3)
    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter", seed=1, std=0.05)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    assert tokenizer.chat_template != template
    tokenizer.chat_template = template
    tokenizer.save_pretrained(adapter)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]) == 0
    assert "tokenizer and chat template: from" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(out).chat_template == template

    tokenizer.add_tokens(["<new_tool_token>"])  # one token past the embedding's rows (a resized vocabulary)
    tokenizer.save_pretrained(adapter)
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert f"has {len(tokenizer)} tokens but the model's embedding only {len(tokenizer) - 1} rows" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()


def test_merge_and_quantize_shard_their_weights_with_max_shard_size(tmp_path, capsys):
    """lorakit merge wrote one safetensors file of any size (transformers 5's save_pretrained default is 50GB: one
    16 GB file for an 8B model) while lorakit quantize shards at 5GB, and neither took a shard size. Now both
    take --max-shard-size (default 5GB); the index names every tensor once, each shard is a 'pt' safetensors file
    and plain transformers loads the folder with the adapter model's logits."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from test_merge_export import IDS, unmerged_logits

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.3)
    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter", seed=1, std=0.05)
    common = ["--model", str(model_dir), "--out"]
    assert main(["merge", *common, str(tmp_path / "x"), "--adapter", str(adapter), "--max-shard-size", "5 gigs"]) == 2
    assert "--max-shard-size '5 gigs' is not a size" in capsys.readouterr().err and not (tmp_path / "x").exists()
    for command, extra in (("merge", ["--adapter", str(adapter), "--dtype", "fp32"]), ("quantize", [])):
        out = tmp_path / command
        assert main([command, *common, str(out), *extra, "--max-shard-size", "20KB"]) == 0
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in out.glob("*.safetensors"))
        if command == "merge":  # the summary counts the shards instead of naming each
            said = capsys.readouterr().out
            assert f", {len(shards)} safetensors shards) in" in said and "model-00001-of" not in said
        assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
        keys = []
        for shard in shards:
            with safe_open(out / shard, "pt") as handle:
                assert handle.metadata().get("format") == "pt"
                keys += list(handle.keys())
        assert sorted(keys) == sorted(index["weight_map"]) and len(keys) == len(set(keys))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merge")
    assert_close(logits(merged, IDS), unmerged_logits(model_dir, adapter), torch.float32)


def test_merge_of_a_float16_base_keeps_float16_by_default(tmp_path, capsys):
    """The default --dtype was bf16 whatever the base stored: a float16 base (Llama 2's files) came back in
    bfloat16, 3 mantissa bits fewer, every weight rounded, the ones the adapter never touched too, while the
    report spoke only of the update. Now a float16 base stays float16 (said in one line); --dtype still chooses."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.3)
    AutoModelForCausalLM.from_pretrained(model_dir).half().save_pretrained(model_dir)
    base = load_file(model_dir / "model.safetensors")
    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter", seed=1, std=0.05,
                           target_modules=["q_proj", "v_proj"])
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    assert "stores float16 weights: the merged folder keeps float16" in capsys.readouterr().out
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.float16}
    untouched = [k for k in base if "q_proj" not in k and "v_proj" not in k]
    assert len(untouched) > 10 and all(torch.equal(merged[k], base[k]) for k in untouched)
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "b"),
                 "--dtype", "bf16"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "b" / "model.safetensors").values()} == {torch.bfloat16}


def test_combine_of_adapters_naming_two_bases_says_so_before_loading(tmp_path, capsys, monkeypatch):
    """Without --model, adapters trained on two bases got 'pass --model <the first one's base>'; that run then
    loaded it and refused the second adapter. Now one line names both adapters and both bases, before loading."""
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    first = tiny_hf_folder(tmp_path / "base-one", initializer_range=0.3)
    second = tiny_hf_folder(tmp_path / "second", seed=2, initializer_range=0.3, hidden_size=64, intermediate_size=96)
    a = make_adapter(AutoModelForCausalLM.from_pretrained(first), tmp_path / "a", seed=1)
    b = make_adapter(AutoModelForCausalLM.from_pretrained(second), tmp_path / "b", seed=2)
    monkeypatch.setattr(lorakit, "load_base", lambda *a, **k: pytest.fail("loaded a base"))
    capsys.readouterr()
    assert main(["combine", "--adapter", str(a), "--adapter", str(b), "--out", str(tmp_path / "ab")]) == 2
    err = capsys.readouterr().err
    assert f"--adapter {a} was trained on '{first}' but --adapter {b} on '{second}'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ab").exists()


def test_export_merged_takes_dtype_names_and_refuses_other_dtypes_before_merging(tmp_path):
    """export_merged(..., dtype="bf16") (transformers takes dtype names) failed with torch's 'Invalid device
    string: bf16' after merging; dtype=torch.int8 merged and unloaded the adapter, then failed in nn.Module.to."""
    from safetensors.torch import load_file

    from lorakit.export import export_merged

    base = tiny_llama(seed=4, initializer_range=0.3)
    lorakit.load_adapter(base, make_adapter(base, tmp_path / "a", seed=5, std=0.1), adapter="a")
    for wrong in (torch.int8, "int8", None):
        with pytest.raises(lorakit.LorakitError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
            export_merged(base, None, "a", tmp_path / "wrong", dtype=wrong)
    assert lorakit.adapter_names(base) == ["a"] and not (tmp_path / "wrong").exists()
    export_merged(base, None, "a", tmp_path / "bf16", dtype="bf16")
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_of_a_bf16_base_loads_it_in_bf16_and_writes_the_float32_maths_bits(tmp_path, capsys, monkeypatch,
                                                                                  variant):
    """lorakit merge loaded every base in float32: a bf16 70B needed 280 GB of memory for a bf16 output. A base
    stored in the output dtype now loads in it; each merged weight is still computed in float32 and rounded once,
    so the folder is bit for bit the one a float32 load writes."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from lorakit.export import export_merged

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.3)
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(model_dir)
    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tmp_path / "adapter",
                           seed=1, std=0.05, variant=variant,
                           target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"])
    reference, tokenizer = lorakit.load_base(str(model_dir), dtype=torch.float32, device="cpu")
    lorakit.load_adapter(reference, adapter, adapter="merged")
    export_merged(reference, tokenizer, "merged", tmp_path / "float32-load", dtype=torch.bfloat16)

    loads = []
    real_load_base = lorakit.load_base
    monkeypatch.setattr(lorakit, "load_base", lambda *a, **k: loads.append(k["dtype"]) or real_load_base(*a, **k))
    assert main(["merge", "--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    assert loads == [torch.bfloat16]
    expected = load_file(tmp_path / "float32-load" / "model.safetensors")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "embed_tokens"]])
def test_merge_of_a_peft_adapter_trained_on_a_resized_vocabulary(tmp_path, capsys, targets):
    """peft saves the embedding and head whole when the vocabulary was resized for new tokens, and loads them over
    a resized base. lorakit merge refused the adapter ('resize the base (model.resize_token_embeddings(N))', which
    a command cannot do, and which in Python then failed as 'a full copy ... that differs': a resize's new rows are
    random). Now the base is resized and takes the saved weights, as peft does; the merged folder has the new
    tokens' rows and the adapter folder's tokenizer, and its logits are the peft model's."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.cli import main

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.3)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([f"<tool_{i}>" for i in range(8)])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(len(tokenizer))
    trained = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.normal_(0, 0.05)
    trained.save_pretrained(tmp_path / "adapter")  # save_embedding_layers="auto": the resized embedding and head
    tokenizer.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[3, 17, 42, len(tokenizer) - 1, 5, len(tokenizer) - 8]])
    expected = logits(trained, ids)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--dtype", "fp32"]) == 0
    said = capsys.readouterr().out
    assert f"resized from {len(tokenizer) - 8} to {len(tokenizer)} tokens" in said
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.vocab_size == len(AutoTokenizer.from_pretrained(out)) == len(tokenizer)
    # with only the embedding targeted, peft saves no head: its new rows were never in the file (said so)
    columns = len(tokenizer) if "embed_tokens" not in targets else len(tokenizer) - 8
    assert ("holds no output head" in said) == ("embed_tokens" in targets)
    assert_close(logits(merged, ids)[..., :columns], expected[..., :columns], torch.float32)


@pytest.mark.parametrize("method", ["cat", "ties"])
def test_combine_loads_a_bf16_base_in_bf16_and_writes_the_same_adapter(tmp_path, capsys, monkeypatch, method):
    """lorakit combine loaded every base in float32 though only the adapters' float32 tensors are combined: a bf16
    70B took 280 GB of memory. It now loads in the stored dtype (float32 still when an input holds whole-module
    copies), and the combined file is bit for bit the float32 load's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.3)
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    a = make_adapter(dense, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj", "embed_tokens"])
    b = make_adapter(dense, tmp_path / "b", seed=2, target_modules=["v_proj", "down_proj"])
    with_copy = make_adapter(dense, tmp_path / "c", seed=3, target_modules=["v_proj"], modules_to_save=["lm_head"])
    options = ["--method", method] + (["--density", "0.5"] if method == "ties" else [])
    loads = []
    real_load_base = lorakit.load_base
    monkeypatch.setattr(lorakit, "load_base", lambda *a, **k: loads.append(k["dtype"]) or real_load_base(*a, **k))
    combine = ["combine", "--model", str(model_dir), "--adapter", f"{a}=0.7", "--adapter", f"{b}=0.4", *options]
    assert main([*combine, "--out", str(tmp_path / "x")]) == 0
    assert main(["combine", "--model", str(model_dir), "--adapter", str(with_copy), "--adapter", str(b),
                 "--out", str(tmp_path / "z"), *options]) == 0
    monkeypatch.setattr("lorakit.train.runner.stored_dtype", lambda model: None)  # as if unknown: float32
    assert main([*combine, "--out", str(tmp_path / "y")]) == 0
    assert loads == [torch.bfloat16, torch.float32, torch.float32]
    x, y = (load_file(tmp_path / out / "adapter_model.safetensors") for out in ("x", "y"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_save_quantized_with_overwrite_never_replaces_the_folder_the_base_was_loaded_from(tmp_path, no_dynamo):
    """lorakit.save_quantized(model, tok, model_dir, overwrite=True) replaced the 16-bit base by its 4-bit copy
    (lorakit quantize protects --model, the Python API did not)."""
    model_dir = tiny_hf_folder(tmp_path / "model", hidden_size=64, intermediate_size=128)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    model, tokenizer = lorakit.load_base(str(model_dir), quantize="nf4", device="cpu")
    for out in (model_dir, model_dir / "nf4"):
        with pytest.raises(lorakit.LorakitError, match="the folder the model was loaded from"):
            lorakit.save_quantized(model, tokenizer, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    lorakit.save_quantized(model, tokenizer, tmp_path / "nf4")  # elsewhere it saves
    assert (tmp_path / "nf4" / "model.safetensors").is_file()


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_export_of_a_4bit_base_merges_layer_by_layer_into_the_same_bits(tmp_path, monkeypatch, no_dynamo, variant):
    """Merging a QLoRA adapter dequantized the whole 4-bit model to float32 before merging and casting: a 70B
    took 280 GB of memory for a bf16 folder of 140. Each 4-bit layer under the adapter is now merged in float32
    on its own and kept in the output dtype at once; the folder is bit for bit the whole-model float32 path's."""
    import copy

    from safetensors.torch import load_file

    import lorakit.quant.quantize as quantize_module
    from lorakit.export import export_merged
    from lorakit.merge import merge_and_unload

    model_dir = tiny_hf_folder(tmp_path / "model", initializer_range=0.3, hidden_size=64, intermediate_size=128)
    model, tokenizer = lorakit.load_base(str(model_dir), quantize="nf4", device="cpu", dtype=torch.bfloat16)
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj"]  # k_proj, o_proj and down_proj stay plain 4-bit layers
    adapter = make_adapter(model, tmp_path / "adapter", seed=1, std=0.05, variant=variant, target_modules=targets)
    lorakit.load_adapter(model, adapter, adapter="a")
    reference = copy.deepcopy(model)
    quantize_module.dequantize(reference, torch.float32)
    expected = {k: v.to(torch.bfloat16) for k, v in merge_and_unload(reference, "a").state_dict().items()}

    made = []
    real_dense_module = quantize_module._dense_module
    monkeypatch.setattr(quantize_module, "_dense_module",
                        lambda layer, dtype, path: made.append((path.rsplit(".", 1)[-1], dtype)) or
                        real_dense_module(layer, dtype, path))
    export_merged(model, tokenizer, "a", tmp_path / "merged", dtype=torch.bfloat16)
    assert {dtype for name, dtype in made if name in targets} == {torch.bfloat16}  # no float32 twin
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert merged.keys() <= expected.keys() and len(merged) > 20
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
