"""``lorakit merge``: the merged Hugging Face folder and the GGUF export, checked against the unmerged model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.cli import main
from lorakit.export import permute_rows
from test_serve_support import make_adapter, tiny_hf_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge")
    # hidden 64, intermediate 96: rows of 64 split into Q8_0 blocks, rows of 96 do too; heads of 16
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.3, hidden_size=64, intermediate_size=96)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapter = make_adapter(base, root / "adapter", seed=1, std=0.05)
    return {"root": root, "model": model_dir, "adapter": adapter}


IDS = torch.tensor([[3, 17, 42, 99, 150, 7, 250, 31, 64], [5, 6, 7, 8, 9, 10, 11, 12, 13]])


def unmerged_logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.load_adapter(model, adapter)
    with torch.no_grad():
        return model(IDS).logits


def test_merged_folder_loads_in_plain_transformers_with_equal_logits(folders, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(folders["model"]), "--adapter", str(folders["adapter"]), "--out", str(out),
                 "--dtype", "fp32"]) == 0
    assert "100.00%" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    # a fresh interpreter in which lorakit cannot be imported at all
    script = (
        "import sys, json, torch; sys.modules['lorakit'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad(): print(json.dumps(m(ids).logits.tolist()))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    merged = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    expected = unmerged_logits(folders["model"], folders["adapter"])
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)


def test_bf16_merge_reports_and_warns_when_the_update_drowns(folders, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folders["model"])
    tiny = make_adapter(base, tmp_path / "tiny", seed=2, std=1e-4)  # far below bf16's step at these weights
    assert main(["merge", "--model", str(folders["model"]), "--adapter", str(tiny), "--out", str(tmp_path / "o1")]) == 0
    captured = capsys.readouterr()
    assert "bfloat16" in captured.out and "warning:" in captured.err and "--dtype fp32" in captured.err  # warns on stderr
    assert main(["merge", "--model", str(folders["model"]), "--adapter", str(folders["adapter"]), "--out",
                 str(tmp_path / "o2"), "--dtype", "bf16"]) == 0
    captured = capsys.readouterr()
    kept = float(captured.out.split("cast to bfloat16: ")[1].split("%")[0])
    assert 50 < kept < 100 and "warning:" not in captured.out + captured.err
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "o2", dtype="auto")  # 4.x's default is float32, 5.x's "auto"
    assert next(saved.parameters()).dtype == torch.bfloat16


def test_existing_out_refused_and_overwrite_is_atomic(folders, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["merge", "--model", str(folders["model"]), "--adapter", str(folders["adapter"]), "--out", str(out)]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(args + ["--overwrite"]) == 2  # --overwrite replaces a previous output, never a user's files
    assert "holds what a model folder does not (keep.txt)" in capsys.readouterr().err and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert main(args) == 0  # an empty folder is used as it is
    (out / "model.safetensors").write_bytes(b"old")
    assert main(args + ["--overwrite"]) == 0
    assert (out / "config.json").exists() and (out / "model.safetensors").read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("variant", ["dora", "embedding-tied"])
def test_merge_matches_for_dora_and_tied_embeddings(tmp_path, variant):
    from lorakit.export import export_merged
    from transformers import AutoModelForCausalLM

    tied = variant == "embedding-tied"
    base = tiny_llama(seed=4, tie_word_embeddings=tied, initializer_range=0.3)
    if tied:
        config = {"target_modules": ["embed_tokens", "q_proj", "v_proj"]}
    else:
        config = {"variant": "dora", "target_modules": "all-linear"}
    folder = make_adapter(base, tmp_path / "adapter", seed=5, std=0.1, **config)
    lorakit.load_adapter(base, folder, adapter="x")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        expected = base(ids).logits
    export_merged(base, None, "x", tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)


# -- GGUF ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_exports(folders):
    out = {}
    for kind in ("f16", "q8_0"):
        folder = folders["root"] / f"gguf-{kind}"
        assert main(["merge", "--model", str(folders["model"]), "--adapter", str(folders["adapter"]), "--out", str(folder),
                     "--dtype", "fp32", "--format", "gguf", "--gguf-type", kind]) == 0
        out[kind] = folder
    return out


def _merged_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _gguf_name(key: str) -> str | None:
    table = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    if key == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = key.split(".", 3)
    module, _, kind = rest.rpartition(".")
    return f"blk.{index}.{table[module]}.{kind}"


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_reader_sees_every_tensor_and_the_metadata(folders, gguf_exports, kind):
    import gguf
    from transformers import AutoConfig

    folder = gguf_exports[kind]
    reader = gguf.GGUFReader(folder / f"gguf-{kind}-{kind}.gguf")
    config = AutoConfig.from_pretrained(folders["model"])
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == config.num_hidden_layers
    assert field("llama.attention.head_count_kv") == config.num_key_value_heads
    assert field("llama.embedding_length") == config.hidden_size
    assert len(field("tokenizer.ggml.tokens")) == config.vocab_size
    assert field("tokenizer.ggml.model") == "gpt2" and "<|im_start|>" in field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    state = _merged_state(folder)
    assert set(tensors) == {_gguf_name(k) for k in state}
    for key, weight in state.items():
        tensor = tensors[_gguf_name(key)]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        expected = weight.float().numpy()
        if ".q_proj." in key:
            expected = permute_rows(expected, config.num_attention_heads)
        elif ".k_proj." in key:
            expected = permute_rows(expected, config.num_key_value_heads)
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            np.testing.assert_array_equal(values, expected)
        elif tensor.tensor_type == gguf.GGMLQuantizationType.F16:
            np.testing.assert_array_equal(values, expected.astype(np.float16).astype(np.float32))
        else:  # Q8_0: 32 values share one f16 scale d = max |x| / 127: error <= d/2 + 127 * (d's f16 rounding)
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            step = np.abs(expected.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(values - expected).reshape(-1, 32) <= step * (0.5 + 127 * 2.0**-11) + 1e-7), key


def test_gguf_loads_in_transformers_with_the_merged_logits(folders, gguf_exports):
    """transformers un-permutes q/k when it reads the file: logits equal the merged model's with f16 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_exports["f16"]
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file="gguf-f16-f16.gguf")
    merged = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for parameter in merged.parameters():
            if parameter.dim() == 2:
                parameter.copy_(parameter.half().float())
        torch.testing.assert_close(from_gguf(IDS).logits, merged(IDS).logits, rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="gguf-f16-f16.gguf")
    original = AutoTokenizer.from_pretrained(folders["model"])
    text = "Paris is the capital of France 🙂 42"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]


def test_gguf_refuses_other_architectures(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.export import export_merged

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"]), adapter="x")
    with pytest.raises(lorakit.LorakitError, match="Llama-architecture"):
        export_merged(model, None, "x", tmp_path / "out", gguf_type="f16")
    assert not (tmp_path / "out").exists()
