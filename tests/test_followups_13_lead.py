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


def test_mixed_batch_over_a_trained_copy_of_an_moe_router():
    """A copied router returns a tuple (logits, scores, expert indices): each row's comes from its own adapter."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    import lorakit

    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    model = Qwen2MoeForCausalLM(config).eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["gate"]), adapter="a")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "copies.a" in name or "lora_B" in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)  # the trained copy routes other experts
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        lorakit.set_adapter(model, "a")
        adapted = model(ids).logits
        with lorakit.disable_adapters(model):
            base = model(ids).logits
        with lorakit.mixed_batch(model, ["a", None, "a"]):
            mixed = model(ids).logits
    assert (adapted - base).abs().max() > 1e-2  # the adapter changes the answer, so the rows below tell apart
    torch.testing.assert_close(mixed[[0, 2]], adapted[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)


def test_rank_pattern_keys_are_compiled_once_not_per_module():
    """re's own cache holds 512 patterns: a file with thousands of keys recompiled each one for every module."""
    from lorakit.config import _pattern_value, _suffix_regex

    patterns = {f"layers\\.{i}\\.mlp\\.down_proj": i for i in range(2000)}
    paths = [f"model.layers.{i}.mlp.down_proj" for i in (0, 7, 1999)] + ["model.layers.0.self_attn.q_proj"]
    assert [_pattern_value(patterns, path, -1) for path in paths] == [0, 7, 1999, -1]
    misses = _suffix_regex.cache_info().misses
    assert [_pattern_value(patterns, path, -1) for path in paths] == [0, 7, 1999, -1]
    assert _suffix_regex.cache_info().misses == misses  # the second pass over every key compiled nothing
    assert _pattern_value({"q_proj": 8, "proj": 4}, "model.layers.0.self_attn.q_proj", 16) == 8  # first match wins
    assert _pattern_value({"proj": 4}, "model.layers.0.self_attn.q_proj", 16) == 16  # whole dotted parts only


_CLOCK_SCRIPT = r"""
import os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 1:  # this process reaches the naming 1.5 s later: past a second's boundary
    real = time.time
    time.time = lambda: real() + 1.5
from lorakit.train.distributed import rank0_clock
from lorakit.train.runner import resolve_run_folder
os.chdir(sys.argv[1])
print(resolve_run_folder(None, None, False, rank0_clock())[0])
dist.destroy_process_group()
"""


def test_torchrun_processes_name_one_run_folder(tmp_path):
    """Without --out each process names runs/<date-time>: from rank 0's clock, not each its own."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "clock.py"
    script.write_text(_CLOCK_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)}) for rank in (0, 1)]
    names = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and names[0].startswith("runs/")
    assert names[0] == names[1]
