"""Audit 15, HF interop: lorakit's Python API on models loaded with transformers the ways users load them, and the
HF tools they combine it with (accelerate's offloading and Accelerator, bitsandbytes configs, 16-bit bases,
gradient checkpointing, generate / pipeline).

Found and fixed:
- A base loaded with ``device_map`` offloading layers to disk (accelerate's AlignDevicesHook keeps their weights on
  the meta device and loads them only for their own forward): ``inject`` built those layers' adapters on the meta
  device (no values: eval logits came out on meta, ``save_adapter`` failed with "Cannot copy out of meta tensor"),
  and the fused eval path read the meta weight directly. Now the adapter is made with the weight loaded, the forward
  calls the base layer, and training, saving and loading agree with peft on the same, unoffloaded, model.
- ``merge`` on such a layer wrote into the empty meta weight and marked the adapter merged: its update was silently
  gone. Now refused in one line, before any layer is written; DoRA, PiSSA and modules_to_save on offloaded layers
  (which read or copy the weight outside its forward) are refused in one line too.
- ``inject`` on a base loaded with ``BitsAndBytesConfig(load_in_8bit=True)`` or 4-bit FP4 said to convert it with
  ``lorakit.quantize(model, 'nf4')``, which refuses exactly those layers; now the line names the kind and the way on.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.errors import LorakitError
from lorakit.inject import lora_layers

IDS = torch.tensor([[5, 9, 17, 3, 101, 44, 7], [8, 2, 66, 13, 90, 1, 12]])
# layer 1 and the output head on disk: accelerate's offload hooks hold their weights on the meta device
OFFLOADED = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "base"
    tiny_llama().save_pretrained(path)
    return path


def offloaded(folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=OFFLOADED, offload_folder=str(tmp_path / "off"))
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta  # really offloaded
    return model


def plain(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def peft_logits(folder, adapter_dir, ids=IDS, **kwargs):
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(plain(folder, **kwargs), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


def train_steps(model, steps=3, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss


# -- accelerate's offloading ------------------------------------------------------------------------------------

def test_disk_offloaded_layers_train_save_and_load_as_peft_reads_them(folder, tmp_path):
    model = offloaded(folder, tmp_path)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1))
    layer = model.model.layers[1].self_attn.q_proj
    assert layer.weight.is_meta and not layer.adapters["default"].lora_A.is_meta  # was meta: no values at all
    loss = train_steps(model)
    assert torch.isfinite(loss) and layer.adapters["default"].lora_B.abs().sum() > 0
    with torch.no_grad():
        ours = model(IDS).logits
    assert ours.device.type == "cpu"  # was a meta tensor: the fused eval path read the offloaded (meta) weight
    lorakit.save_adapter(model, tmp_path / "adapter")  # was "Cannot copy out of meta tensor"
    assert_close(ours, peft_logits(folder, tmp_path / "adapter"))  # peft on the same base, not offloaded
    again = offloaded(folder, tmp_path / "again")
    lorakit.load_adapter(again, tmp_path / "adapter")
    again.eval()
    with torch.no_grad():
        assert_close(again(IDS).logits, ours)


def test_merge_into_an_offloaded_weight_is_refused_and_nothing_merges(folder, tmp_path):
    model = offloaded(folder, tmp_path)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="gaussian"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    model.eval()
    with torch.no_grad():
        before = model(IDS).logits
    for call in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(LorakitError) as refused:
            call(model)
        message = str(refused.value)
        assert "\n" not in message and "model.layers.1.self_attn.q_proj is offloaded by accelerate" in message
        assert "run the adapter unmerged" in message
    assert all(not layer.merged for layer in lora_layers(model).values())  # layer 0 too
    with torch.no_grad():  # was: the update silently lost from the offloaded layers
        assert torch.equal(model(IDS).logits, before)


@pytest.mark.parametrize("config, what", [
    (dict(variant="dora"), "variant='dora'"),
    (dict(init="pissa"), "init='pissa'"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_what_reads_an_offloaded_weight_outside_its_forward_is_refused(folder, tmp_path, config, what):
    model = offloaded(folder, tmp_path)
    with pytest.raises(LorakitError) as refused:
        lorakit.inject(model, lorakit.LoraConfig(r=4, **config))
    assert "\n" not in str(refused.value) and "offloaded by accelerate" in str(refused.value)
    assert what in str(refused.value)
    assert lorakit.adapter_names(model) == []  # refused before anything changed



def test_a_mixed_batch_on_an_offloaded_base_equals_the_base_kept_in_memory(folder, tmp_path):
    """lorakit.mixed_batch's stacked (SGMV) prefill, taken where the Triton kernels run (a GPU; the interpreter in
    these tests), added the base GEMM from ``base.weight`` directly: on an offloaded layer that is the empty meta
    tensor, and the rows came out without the base's own output (logits off by ~0.3, no error)."""
    models = [offloaded(folder, tmp_path), plain(folder)]
    for model in models:
        for name, seed in (("a", 1), ("b", 2)):
            torch.manual_seed(seed)
            lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="gaussian"),
                           adapter=name)
            for path, parameter in model.named_parameters():
                if f"adapters.{name}.lora_B" in path:
                    torch.nn.init.normal_(parameter, std=0.3, generator=torch.Generator().manual_seed(seed))
        model.eval()
    ids = torch.randint(3, 120, (2, 40), generator=torch.Generator().manual_seed(0))  # a prefill: 80 rows
    logits = []
    for model in models:
        with lorakit.mixed_batch(model, ["a", "b"]), torch.no_grad():
            logits.append(model(ids).logits)
    assert_close(logits[0], logits[1])

# -- bitsandbytes configs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantization, kind", [
    (dict(load_in_8bit=True), "8-bit (LLM.int8)"),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32), "4-bit 'fp4'"),
])
def test_bnb_8bit_and_fp4_bases_are_refused_with_a_way_that_works(folder, quantization, kind):
    pytest.importorskip("bitsandbytes")
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**quantization),
                                                 device_map="cpu")
    with pytest.raises(LorakitError) as refused:
        lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    message = str(refused.value)
    assert "\n" not in message and kind in message and "without quantization_config (16-bit)" in message
    # the old line's advice, which lorakit.quantize then refuses for these very layers
    assert "quantize(model, 'nf4') first" not in message
    with pytest.raises(LorakitError):
        lorakit.quantize(model, "nf4")
    assert lorakit.adapter_names(model) == []


# -- 16-bit bases, gradient checkpointing, generate, pipeline, Accelerator ------------------------------------------

def test_bf16_base_trains_float32_adapters_and_saves_them_as_peft_reads(folder, tmp_path):
    model = plain(folder, dtype=torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    loss = train_steps(model)
    assert torch.isfinite(loss)
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_A.dtype == torch.float32 and adapter.lora_B.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    lorakit.save_adapter(model, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(key).dtype for key in saved.keys()} == {torch.float32}
    with torch.no_grad():
        assert_close(model(IDS).logits, peft_logits(folder, tmp_path / "adapter", dtype=torch.bfloat16))


@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_enabled_by_the_user_gives_the_same_gradients(folder, when):
    grads = []
    for checkpointing in (False, True):
        model = plain(folder)
        if checkpointing and when == "before":
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        torch.manual_seed(0)
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="gaussian"))
        if checkpointing and when == "after":
            model.gradient_checkpointing_enable()
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert model.is_gradient_checkpointing == checkpointing
    assert grads[0].keys() == grads[1].keys() and all(grads[1][n] is not None for n in grads[1])
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name])


def _two_adapters(folder):
    model = plain(folder)
    for name, seed in (("a", 1), ("b", 2)):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"), adapter=name)
        for path, parameter in model.named_parameters():
            if f"adapters.{name}.lora_B" in path:
                torch.nn.init.normal_(parameter, std=0.5, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def test_generate_and_pipeline_use_the_active_adapter_and_mixed_batches_match_single_runs(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    model = _two_adapters(folder)
    generate = lambda ids: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,  # noqa: E731
                                          do_sample=False, pad_token_id=0)
    single = {}
    for name in ("a", "b"):
        lorakit.set_adapter(model, name)
        single[name] = generate(IDS)
    with lorakit.disable_adapters(model):
        base = generate(IDS)
    assert not torch.equal(single["a"], single["b"]) and not torch.equal(single["a"], base)
    with lorakit.mixed_batch(model, ["a", "b"]):  # each row its own adapter, in one generate
        mixed = generate(IDS)
    assert torch.equal(mixed, torch.stack([single["a"][0], single["b"][1]]))
    vocab = {f"w{i}x": i for i in range(128)}  # one word per id, none a prefix of another
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0x"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w2x", pad_token="w0x")
    lorakit.set_adapter(model, "b")
    text = " ".join(f"w{i}x" for i in IDS[0].tolist())
    assert tokenizer(text).input_ids == IDS[0].tolist()
    out = pipeline("text-generation", model=model, tokenizer=tokenizer)(text, max_new_tokens=3, do_sample=False)
    new = out[0]["generated_text"][len(text):].split()
    assert new == [f"w{i}x" for i in single["b"][0, IDS.shape[1]:].tolist()]


def test_accelerator_prepare_trains_as_a_plain_loop_and_the_unwrapped_model_saves_its_adapter(folder, tmp_path):
    from accelerate import Accelerator

    model = plain(folder)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="gaussian"))
    twin = copy.deepcopy(model)  # an independent copy: its own adapters, trained by the plain loop
    assert twin.model.layers[0].self_attn.q_proj.adapters["default"].lora_A is not \
        model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prepared, prepared_optimizer = accelerator.prepare(model, optimizer)
    prepared.train()
    for _ in range(2):
        accelerator.backward(prepared(IDS, labels=IDS).loss)
        prepared_optimizer.step()
        prepared_optimizer.zero_grad()
    train_steps(twin, steps=2)
    unwrapped = accelerator.unwrap_model(prepared).eval()
    lorakit.save_adapter(unwrapped, tmp_path / "adapter")
    with torch.no_grad():
        ours = unwrapped(IDS).logits
        assert_close(ours, twin(IDS).logits)
    assert_close(ours, peft_logits(folder, tmp_path / "adapter"))


def test_generate_takes_peft_adapter_names_per_row_as_peft_does(folder, tmp_path):
    """peft's ``generate(..., adapter_names=[...])`` ("__base__": the base alone) was refused by transformers as an
    unused model kwarg ('The following `model_kwargs` are not used by the model'); it now runs as mixed_batch and
    gives peft's tokens, beams and returned sequences included."""
    peft = pytest.importorskip("peft")
    model = _two_adapters(folder)
    for name in ("a", "b"):
        lorakit.save_adapter(model, tmp_path / name, adapter=name)
    theirs = peft.PeftModel.from_pretrained(plain(folder), str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    theirs.eval()
    ids = torch.cat([IDS, IDS[:1].flip(1)])
    names = ["b", "__base__", "a"]
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    for extra in ({}, dict(num_beams=2, num_return_sequences=2)):
        ours = model.generate(ids, adapter_names=names, **settings, **extra)
        assert torch.equal(ours, theirs.generate(input_ids=ids, adapter_names=names, **settings, **extra))
    assert not lorakit.adapters.mixed_batch_open(model)  # the block closed with generate
    with pytest.raises(LorakitError, match="unknown adapter 'c'"):
        model.generate(ids, adapter_names=["a", "c", None], **settings)


def test_push_to_hub_uploads_the_adapter_folder_as_peft_does(folder, tmp_path, monkeypatch):
    """``model.push_to_hub`` saves through the model's ``save_pretrained``: an injected model uploads its adapter
    folder (PeftModel.push_to_hub's files), which peft loads with the same logits. The hub calls are the only stubs."""
    import shutil
    import types

    import transformers.utils.hub as hub

    model = plain(folder)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    monkeypatch.setattr(hub, "hf_api", lambda: types.SimpleNamespace(
        create_repo=lambda repo_id, **_: types.SimpleNamespace(repo_id=repo_id)))
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: types.SimpleNamespace(
        save=lambda path: open(path, "w").write("card")))
    uploaded = {}

    def upload(work_dir, repo_id, **_):  # what would go to the hub: a copy of the folder before it is deleted
        uploaded[repo_id] = shutil.copytree(work_dir, tmp_path / "pushed")

    monkeypatch.setattr(model, "_upload_modified_files", upload)
    model.push_to_hub("me/orders")
    pushed = uploaded["me/orders"]
    assert sorted(p.name for p in pushed.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with torch.no_grad():
        assert_close(model(IDS).logits, peft_logits(folder, pushed))


def test_state_dict_round_trip_and_casting_the_injected_model_as_peft_casts_its_own(folder, tmp_path):
    """torch.save(model.state_dict()) into a freshly injected model (loaded with weights_only) restores it exactly;
    model.to(bfloat16) / .half() cast the adapters with the base, as on a PeftModel, and keep peft's logits."""
    model = plain(folder)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1))
    train_steps(model, steps=2)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    again = plain(folder)
    lorakit.inject(again, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1))
    result = again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)
    lorakit.save_adapter(model, tmp_path / "adapter")
    peft = pytest.importorskip("peft")
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        ours = cast(copy.deepcopy(model))
        theirs = cast(peft.PeftModel.from_pretrained(plain(folder), str(tmp_path / "adapter")).eval())
        layer = ours.model.layers[0].self_attn.q_proj
        dtype = layer.weight.dtype
        assert layer.adapters["default"].lora_A.dtype == dtype == theirs.base_model.model.model.layers[0].self_attn \
            .q_proj.lora_A["default"].weight.dtype
        with torch.no_grad():
            assert_close(ours(IDS).logits, theirs(IDS).logits.float(), dtype=dtype)
