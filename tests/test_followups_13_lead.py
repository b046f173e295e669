"""Follow-ups of the thirteenth session (lead): a merged or 4-bit folder carries its base's license and notices."""

from __future__ import annotations


import pytest
from transformers import AutoModelForCausalLM

from lorakit.cli import main
from test_serve_support import make_adapter, tiny_hf_folder

NOTICES = {"LICENSE": "Llama 3.2 Community License\n", "USE_POLICY.md": "acceptable use\n", "NOTICE": "Apache\n"}


@pytest.fixture(scope="module")
def licensed(tmp_path_factory):
    root = tmp_path_factory.mktemp("licensed")
    model = tiny_hf_folder(root / "model")
    for name, text in NOTICES.items():
        (model / name).write_text(text)
    (model / "README.md").write_text("the base's model card\n")  # describes the base, not the merge: stays behind
    (model / "LICENSE.huge").write_bytes(b"x" * (5 << 20))  # not a license by its size
    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(model), root / "adapter", seed=1)
    return model, adapter


def test_merge_copies_the_base_license_and_overwrite_accepts_it(licensed, tmp_path, capsys):
    model, adapter = licensed
    out = tmp_path / "merged"
    args = ["merge", "--model", str(model), "--adapter", str(adapter), "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    for name, text in NOTICES.items():
        assert (out / name).read_text() == text
        assert (out / name).stat().st_mode & 0o044 == 0o044  # readable by others, as the model files
    assert not (out / "README.md").exists() and not (out / "LICENSE.huge").exists()
    assert main(args + ["--overwrite"]) == 0, capsys.readouterr().err  # a previous merge's license is its own file
    assert (out / "LICENSE").read_text() == NOTICES["LICENSE"]


def test_quantized_folder_copies_the_base_license(licensed, tmp_path, capsys):
    model, _ = licensed
    out = tmp_path / "nf4"
    assert main(["quantize", "--model", str(model), "--out", str(out)]) == 0, capsys.readouterr().err
    assert {name: (out / name).read_text() for name in NOTICES} == NOTICES


def test_a_model_built_in_memory_has_no_notices_to_copy(tmp_path):
    from conftest import tiny_llama
    from lorakit.export import copy_notices

    assert copy_notices(tiny_llama(), tmp_path) == []
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_folder(tmp_path / "plain"))
    assert copy_notices(model, tmp_path) == []  # a folder without license files
