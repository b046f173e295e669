"""Adapters saved by older peft versions (0.4.0, 0.6.2, 0.10.0, 0.13.2: what hub adapters of 2023-2024 were saved
with), loaded by lorakit with the logits those versions gave.

``tests/data/old_peft/`` holds a tiny random Llama (hidden 32, 2 layers, vocab 128; saved by transformers 4.46.3, with
a 128-word tokenizer) and, under ``<peft version>/<kind>/``, adapters that peft version saved on it with
``safe_serialization=True`` (the tensors given random values first), beside ``expected_logits.json``: the logits of
the last three positions of ``input_ids`` and four greedy tokens, under that peft (torch 2.13 CPU, float32).
``make_old_peft.py`` there wrote them (AdaLoRA and (IA)^3 too). peft 0.4 / 0.6's default save is a pickled ``adapter_model.bin``: lorakit
refuses it in one line that says how to convert, and never unpickles it.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from cli_helpers import cli_error
from conftest import assert_close
from lorakit.cli import main
from lorakit.errors import LorakitError

DATA = Path(__file__).parent / "data" / "old_peft"
BASE = DATA / "base"
FOLDERS = sorted(p.relative_to(DATA).as_posix() for p in DATA.glob("*/*") if (p / "adapter_config.json").is_file())
# peft repeats layers inside the model / (IA)^3 is no low-rank product: each refused by name, see below
REFUSED = {"0.10.0/layer_replication", "0.4.0/ia3"}
LOADED = [name for name in FOLDERS if name not in REFUSED]


def expected(folder: Path) -> dict:
    return json.loads((folder / "expected_logits.json").read_text())


def lorakit_logits(folder: Path) -> torch.Tensor:
    """(3, 128) float32 logits of the expected file's positions: lorakit's base + the adapter."""
    want = expected(folder)
    model = lorakit.load_base(str(BASE))[0]
    lorakit.load_adapter(model, folder)
    with torch.no_grad():
        return model(input_ids=torch.tensor([want["input_ids"]])).logits[0, want["positions"]].float()


def prompt(ids: list[int]) -> str:
    """The text the base's word-level tokenizer reads as ``ids`` (no special tokens added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    text = " ".join(tokenizer.convert_ids_to_tokens(ids))
    assert tokenizer(text, add_special_tokens=False).input_ids == ids
    return text


def copy_of(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name.replace("/", "_")
    shutil.copytree(DATA / name, out)
    return out


def edit_config(folder: Path, **changes) -> Path:
    """Set (or, for a value of ``...``, remove) fields of the folder's adapter_config.json."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return folder


def test_the_data_covers_each_version_and_kind():
    """The committed folders: every version, and the kinds that version saves (LoRA on q/v with an lm_head copy,
    all-linear, rank/alpha patterns, rsLoRA, DoRA, an embedding LoRA, bias, no task_type; AdaLoRA trained through
    its final phase, whose rank_pattern of bool lists resized the saved tensors)."""
    assert {name.split("/")[0] for name in FOLDERS} == {"0.4.0", "0.6.2", "0.10.0", "0.13.2"}
    assert {name.split("/")[1] for name in FOLDERS} >= {"qv_safe", "qv_notask", "patterns", "all_linear", "rslora",
                                                         "dora", "dora_all", "emb_lora", "bias_all", "layer_replication",
                                                         "adalora_trained", "ia3"}
    for name in FOLDERS:
        assert expected(DATA / name)["peft"] == name.split("/")[0]
        assert not list((DATA / name).glob("*.bin"))


@pytest.mark.parametrize("name", LOADED)
def test_old_peft_adapter_loads_with_that_peft_versions_logits(name):
    want = torch.tensor(expected(DATA / name)["logits"])
    assert_close(lorakit_logits(DATA / name), want, torch.float32)


def test_the_adapters_change_the_logits():
    """The comparison above means something: each adapter moves the base's logits well beyond the tolerance."""
    want = expected(DATA / "0.4.0/qv_safe")
    with torch.no_grad():
        base = lorakit.load_base(str(BASE))[0](input_ids=torch.tensor([want["input_ids"]])).logits[0, want["positions"]]
    for name in LOADED:
        assert (base - torch.tensor(expected(DATA / name)["logits"])).abs().max() > 1e-2, name


def test_layer_replication_is_refused_by_name():
    with pytest.raises(LorakitError, match=r"layer_replication=\[\[0, 2\], \[1, 2\]\] is not supported") as error:
        lorakit.load_adapter(lorakit.load_base(str(BASE))[0], DATA / "0.10.0/layer_replication")
    assert "\n" not in str(error.value)


def test_an_ia3_adapter_of_peft_0_4_is_refused_by_its_peft_type():
    with pytest.raises(LorakitError, match="peft_type 'IA3' is not LoRA; lorakit reads LoRA adapters only") as error:
        lorakit.load_adapter(lorakit.load_base(str(BASE))[0], DATA / "0.4.0/ia3")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["0.6.2/adalora_trained", "0.13.2/adalora_trained"])
def test_the_old_adalora_rank_pattern_is_the_bool_lists_of_the_allocator(name):
    """What the AdaLoRA folders test: rank_pattern's masks of init_r bools, and tensors peft resized to them."""
    from safetensors.torch import load_file

    pattern = json.loads((DATA / name / "adapter_config.json").read_text())["rank_pattern"]
    tensors = load_file(DATA / name / "adapter_model.safetensors")
    for key, mask in pattern.items():  # key: model.layers.0.self_attn.q_proj.lora_E
        assert len(mask) == 6 and all(isinstance(x, bool) for x in mask)
        assert tuple(tensors[f"base_model.model.{key}"].shape) == (sum(mask), 1) and sum(mask) < 6
    assert len({sum(mask) for mask in pattern.values()}) > 1


class _Unpickled:
    """Unpickling this writes ``marker``: a file that appears only if something unpickled the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.parametrize("name", ["0.4.0/qv_safe", "0.6.2/qv_safe"])
def test_a_pickled_adapter_model_bin_is_refused_in_one_line_and_never_unpickled(name, tmp_path):
    """peft 0.4 / 0.6 save ``adapter_model.bin`` by default (torch.save: a pickle)."""
    folder = copy_of(name, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "marker"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Unpickled(marker)))
    with pytest.raises(LorakitError, match="is a pickled checkpoint; lorakit never unpickles files") as error:
        lorakit.load_adapter(lorakit.load_base(str(BASE))[0], folder)
    assert "\n" not in str(error.value) and not marker.exists()


def test_the_conversion_the_refusal_gives_makes_an_adapter_with_the_same_logits(tmp_path):
    """The refusal's command, run as written on a real torch.save'd adapter_model.bin (peft 0.6's default), writes
    the safetensors file lorakit then loads with that peft's logits."""
    from safetensors.torch import load_file

    folder = copy_of("0.6.2/qv_safe", tmp_path)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(LorakitError) as error:
        lorakit.load_adapter(lorakit.load_base(str(BASE))[0], folder)
    command = re.search(r'python -c "(.*?)"', str(error.value)).group(1)
    subprocess.run([sys.executable, "-c", command], check=True, timeout=120)
    assert_close(lorakit_logits(folder), torch.tensor(expected(folder)["logits"]), torch.float32)


# fields of older or hand-edited configs: peft 0.1-0.3's enable_lora / merge_weights (alpaca-lora's adapters),
# PeftConfig's revision, base_model_name_or_path null, no task_type / inference_mode (peft 0.4 wrote task_type null)
@pytest.mark.parametrize("changes", [
    dict(enable_lora=None, merge_weights=False), dict(merge_weights=True), dict(revision="main"),
    dict(base_model_name_or_path=None), dict(base_model_name_or_path=...), dict(task_type=...),
    dict(inference_mode=...), dict(auto_mapping=...), dict(layers_pattern=..., layers_to_transform=...),
], ids=lambda changes: ",".join(changes))
def test_old_config_fields_load_with_the_same_logits(changes, tmp_path):
    folder = edit_config(copy_of("0.4.0/qv_safe", tmp_path), **changes)
    assert_close(lorakit_logits(folder), torch.tensor(expected(folder)["logits"]), torch.float32)


def test_fields_peft_added_later_missing_from_a_0_4_config():
    """peft 0.4's config has no use_dora, use_rslora, rank_pattern, alpha_pattern, layer_replication: read as off."""
    config = json.loads((DATA / "0.4.0/qv_safe/adapter_config.json").read_text())
    assert not {"use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layer_replication"} & set(config)


def test_enable_lora_on_a_fused_layer_is_refused_by_name(tmp_path):
    folder = edit_config(copy_of("0.4.0/qv_safe", tmp_path), enable_lora=[True, False, True], merge_weights=False)
    with pytest.raises(LorakitError, match=r"enable_lora=\[True, False, True\] is early peft's") as error:
        lorakit.load_adapter(lorakit.load_base(str(BASE))[0], folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["0.10.0/dora", "0.13.2/dora_all"])
def test_a_dora_adapter_whose_config_lost_use_dora_is_refused_naming_it(name, tmp_path):
    """A config hand-copied from a pre-0.9 peft lacks use_dora: lorakit refuses the magnitudes rather than drop them."""
    folder = edit_config(copy_of(name, tmp_path), use_dora=...)
    with pytest.raises(LorakitError, match="lora_magnitude_vector is a DoRA magnitude, but adapter_config.json has no "
                                           "use_dora: true") as error:
        lorakit.load_adapter(lorakit.load_base(str(BASE))[0], folder)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["0.4.0/qv_safe", "0.6.2/patterns", "0.10.0/dora", "0.13.2/dora_all"])
def test_lorakit_generate_answers_that_peft_versions_greedy_tokens(name, capsys):
    want = expected(DATA / name)
    code = main(["generate", "--model", str(BASE), "--adapter", str(DATA / name), "--no-chat", "--max-new-tokens",
                 str(len(want["greedy"])), "--dtype", "fp32", "--device", "cpu", prompt(want["input_ids"])])
    out = capsys.readouterr().out
    assert code == 0
    assert out.split() == prompt(want["greedy"]).split()


@pytest.mark.parametrize("name", ["0.4.0/qv_safe", "0.6.2/patterns", "0.10.0/all_linear", "0.10.0/dora",
                                  "0.4.0/emb_lora", "0.6.2/adalora_trained"])
def test_lorakit_merge_gives_a_folder_with_that_peft_versions_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    want = expected(DATA / name)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(BASE), "--adapter", str(DATA / name), "--out", str(out), "--dtype",
                 "fp32"]) == 0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(torch.tensor([want["input_ids"]])).logits[0, want["positions"]]
    assert_close(got, torch.tensor(want["logits"]), torch.float32)


def test_lorakit_merge_refuses_layer_replication_in_one_line(tmp_path, capsys):
    code = main(["merge", "--model", str(BASE), "--adapter", str(DATA / "0.10.0/layer_replication"), "--out",
                 str(tmp_path / "merged")])
    assert "layer_replication=[[0, 2], [1, 2]] is not supported" in cli_error(capsys, code)
    assert not (tmp_path / "merged").exists()
