"""Hostile adapter files outside the server: one-line errors, capped messages, load what was checked, tied heads.

Each test here failed on the code before its fix (lorakit/io.py, config.py, merge.py, serve/pool.py).
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

import lorakit
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from conftest import assert_close, tiny_llama
from test_serve_support import make_adapter

LIMIT = 600  # no error message that quotes file data may be longer than this


@pytest.fixture
def saved(tmp_path):
    return make_adapter(tiny_llama(), tmp_path / "adapter", seed=3, target_modules=["q_proj", "v_proj"])


def good_config(folder):
    return json.loads((folder / CONFIG_NAME).read_text())


def refusal(folder, match=None, **kwargs) -> str:
    """The LorakitError message of loading ``folder`` (the model must be left without adapters)."""
    model = tiny_llama()
    with pytest.raises(lorakit.LorakitError, match=match) as info:
        lorakit.load_adapter(model, folder, **kwargs)
    assert lorakit.adapter_names(model) == []
    message = str(info.value)
    assert "\n" not in message
    return message


# -- 1: hostile adapter_config.json ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, words", [
    ('{"r": 4, "junk": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"r": 4' + ', "lora_alpha": 1' + "0" * 5000 + "}", "digits"),
])
def test_deep_or_huge_number_config_is_one_line_error(saved, text, words):
    (saved / CONFIG_NAME).write_text(text)
    with pytest.raises(lorakit.LorakitError, match=words) as info:
        lorakit.read_adapter(saved)
    assert CONFIG_NAME in str(info.value) and len(str(info.value)) < LIMIT
    assert str(info.value) == refusal(saved, match=words)


def test_config_over_one_mib_refused_before_parsing(saved, monkeypatch):
    config = good_config(saved)
    (saved / CONFIG_NAME).write_text(json.dumps(config) + " " * (1 << 20))  # valid JSON, just too big
    parsed = []
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(1))
    message = refusal(saved)
    assert "over the limit of 1,048,576" in message and CONFIG_NAME in message
    assert parsed == []


# -- 2: messages that quote file data are capped ------------------------------------------------------------------
def test_unknown_field_with_a_20_mb_value():
    with pytest.raises(lorakit.LorakitError, match="unknown field 'junk'") as info:
        lorakit.LoraConfig.from_peft_dict({"r": 4, "junk": "x" * 20_000_000})
    assert len(str(info.value)) < LIMIT and "..." in str(info.value)


@pytest.mark.parametrize("change", [
    {"junk": "x" * 900_000},  # an unknown field with a long value (the file stays under the 1 MiB limit)
    {"k" * 100_000: 1},  # an unknown field with a 100 KB name
    {"target_modules": ["q_proj"] * 50_000 + [7]},
    {"target_modules": "(" * 100_000},  # a broken regex, deep enough to make re.compile recurse
    {"target_modules": "a" * 100_000 + ")"},  # a broken regex
    {"rank_pattern": {"q" * 100_000: -1}},
    {"peft_type": "X" * 100_000},
    {"use_dora": True, "lora_bias": "b" * 100_000},
    {"junk": [[[[[[[[[[[[[["deep"] * 1000]]]]]]]]]]]]]},
])
def test_config_errors_quote_capped_values(saved, change):
    (saved / CONFIG_NAME).write_text(json.dumps({**good_config(saved), **change}))
    message = refusal(saved)
    assert len(message) < LIMIT and "..." in message and "nested too deeply" not in message


def test_tensor_key_errors_are_capped(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / WEIGHTS_NAME)
    extra = {f"base_model.model.{'x' * 50_000}.{i}.lora_A.weight": torch.zeros(1, 1) for i in range(200)}
    save_file({**tensors, **extra}, saved / WEIGHTS_NAME)
    message = refusal(saved)
    assert "unexpected tensor keys" in message and "and 195 more" in message and len(message) < LIMIT
    # every tensor missing: the list is cut to a few keys
    save_file({"base_model.model.x": torch.zeros(1)}, saved / WEIGHTS_NAME)
    config = {**good_config(saved), "target_modules": "all-linear"}
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    assert lorakit.read_adapter(saved).tensors.keys() == {"base_model.model.x"}
    message = refusal(saved)
    assert message.endswith("unexpected tensor keys for this model and config: base_model.model.x")
    save_file({}, saved / WEIGHTS_NAME)
    message = refusal(saved)
    assert "missing tensor keys" in message and " more (28 in all)" in message and len(message) < LIMIT


def test_shown_and_listed_helpers():
    from lorakit.config import clipped, listed, shown

    assert shown("abc") == "'abc'"
    assert len(shown("x" * 10**6)) <= 80 and "..." in shown("x" * 10**6)
    assert clipped("a\nb") == "a\\nb" and clipped("z" * 100, 10) == "zzzzzzz..."
    assert "digits" in shown(10**5000)  # repr() of this int raises ValueError; the helper must not
    nested: list = []
    for _ in range(10_000):  # repr() of this raises RecursionError
        nested = [nested]
    assert len(shown(nested)) <= 80
    assert listed(["a", "b"]) == "a, b"
    assert listed([str(i) for i in range(9)], limit=3) == "0, 1, 2 and 6 more"
    assert "\n" not in listed(["a\nb"]) and len(listed(["y" * 10**5])) <= 80


# -- 3: load exactly what was checked; no symlinks where asked ----------------------------------------------------
def test_load_adapter_takes_the_already_read_object(tmp_path):
    model = tiny_llama()
    first = lorakit.read_adapter(make_adapter(model, tmp_path / "a", seed=1))
    make_adapter(model, tmp_path / "b", seed=2)
    for name in (CONFIG_NAME, WEIGHTS_NAME):  # swap the files after the check
        os.replace(tmp_path / "b" / name, tmp_path / "a" / name)
    assert lorakit.load_adapter(model, first, adapter="x") == "x"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    loaded = model.model.layers[0].self_attn.q_proj.adapters["x"].lora_B
    assert torch.equal(loaded, first.tensors[key])
    # the folder form still works and reads the (new) files
    lorakit.load_adapter(model, tmp_path / "a", adapter="y")
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.adapters["y"].lora_B, loaded)
    with pytest.raises(lorakit.LorakitError, match="over the limit"):
        lorakit.load_adapter(model, first, adapter="z", max_bytes=10)


def test_symlinked_files_refused_when_not_following(tmp_path):
    model = tiny_llama()
    real = make_adapter(model, tmp_path / "real", seed=1)
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):  # the Hugging Face hub cache lays adapters out like this
        (linked / name).symlink_to(real / name)
    lorakit.load_adapter(model, linked)  # followed by default: hub cache folders load
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        half = tmp_path / f"half_{name}"
        half.mkdir()
        for other in (CONFIG_NAME, WEIGHTS_NAME):
            target = half / other
            target.symlink_to(real / other) if other == name else target.write_bytes((real / other).read_bytes())
        message = refusal(half, follow_symlinks=False)
        assert "symbolic link" in message and name in message
        assert lorakit.read_adapter(half).tensors.keys() == lorakit.read_adapter(real).tensors.keys()
    folder_link = tmp_path / "folder_link"
    folder_link.symlink_to(real, target_is_directory=True)
    assert "symbolic link" in refusal(folder_link, follow_symlinks=False)


def test_server_pool_loads_the_files_it_checked(tmp_path, monkeypatch):
    """Files swapped between the pool's checks and the load: the checked version is what serves."""
    from lorakit.serve.pool import AdapterPool

    model = tiny_llama()
    root = tmp_path / "adapters"
    checked = lorakit.read_adapter(make_adapter(model, root / "a", seed=1))
    swapped = make_adapter(model, tmp_path / "other", seed=2, r=8)
    pool = AdapterPool(model, root, threading.RLock())
    admit = pool._admit

    def admit_then_swap(name, folder):
        adapter_file = admit(name, folder)
        for file_name in (CONFIG_NAME, WEIGHTS_NAME):
            os.replace(swapped / file_name, folder / file_name)
        return adapter_file

    monkeypatch.setattr(pool, "_admit", admit_then_swap)
    internal = pool.acquire("a")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(model.model.layers[0].self_attn.q_proj.adapters[internal].lora_B, checked.tensors[key])
    monkeypatch.undo()
    # the pool opens files without following links: one inside the folder is refused too (it could be swapped
    # for one leading outside between the path check and the open)
    linked = root / "linked"
    linked.mkdir()
    (linked / CONFIG_NAME).write_bytes((root / "a" / CONFIG_NAME).read_bytes())
    (linked / WEIGHTS_NAME).symlink_to(root / "a" / WEIGHTS_NAME)
    with pytest.raises(lorakit.LorakitError, match="symbolic link"):
        pool.acquire("linked")


# -- 4: merging into a tied embedding / head, then save_pretrained ------------------------------------------------
@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_merge_and_unload_of_tied_weight_saves_and_reloads(tmp_path, target):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=[target, "q_proj"]))
    with torch.no_grad():
        for name, parameter in lorakit.lora_parameters(model):
            parameter.copy_(torch.randn(parameter.shape) * 0.3)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    lorakit.merge_and_unload(model)
    with torch.no_grad():
        assert_close(model(ids).logits, expected)
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert_close(reloaded(ids).logits, expected)


def test_merge_and_unload_keeps_untouched_ties(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    lorakit.merge_and_unload(model)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_save_adapter_to_a_path_it_cannot_write_is_one_line(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    (tmp_path / "file").write_text("x")
    with pytest.raises(lorakit.LorakitError, match=r"cannot save the adapter to .*file.*sub: .*; choose a folder you can write"):
        lorakit.save_adapter(model, tmp_path / "file" / "sub")  # a folder under a file
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("failing_call", [1, 2])
def test_replace_folder_puts_the_old_output_back_when_a_rename_fails(tmp_path, monkeypatch, failing_call):
    """A failed swap (EBUSY, a full disk) left the old output in a hidden .NAME.*.old folder, or an empty one."""
    from lorakit import _fs

    out, new = tmp_path / "merged", tmp_path / ".merged.tmp"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    real, calls = os.replace, []

    def flaky(src, dst):
        calls.append(1)
        if len(calls) == failing_call:
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(_fs.os, "replace", flaky)
    with pytest.raises(OSError, match="busy"):
        _fs.replace_folder(new, out)
    assert (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.tmp", "merged"]  # no hidden .old folder left
    monkeypatch.undo()
    _fs.replace_folder(new, out)
    assert (out / "model.safetensors").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
