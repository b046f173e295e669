"""Thirteenth new-user audit: other people's model folders, laid out the way Hugging Face Hub downloads are.

Each folder is the tiny test Llama (``make_model_folder``) changed into one real-world layout: sharded safetensors
with an index (whole, or missing a shard), pickled ``pytorch_model.bin`` only or beside safetensors, a chat template
in ``chat_template.json``, a ``tokenizer.json`` with no ``tokenizer_config.json``, a malformed
``generation_config.json``, code the folder wants run (``auto_map``), ``"torch_dtype": "auto"``, a vision-language
folder, a path with spaces and non-ASCII letters, and merge outputs that cannot or must not be written.
``lorakit generate`` / ``train`` (2 steps) / ``merge`` / ``inspect`` run in-process through ``lorakit.cli.main``.
The rule: each works, or is refused in one stderr line (exit 2, no traceback) that says what is wrong and how to fix
it, and a refused command writes nothing.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main
from test_train_helpers import make_model_folder, task_records, tiny_tokenizer, write_jsonl

PROMPT = "reverse a b :"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A plain tiny folder, training data and a 2-step adapter of that folder, shared by the tests below."""
    root = tmp_path_factory.mktemp("audit13")
    make_model_folder(root / "plain")
    write_jsonl(root / "train.jsonl", task_records(8, seed=1))
    assert _run("train", "--model", root / "plain", "--data", root / "train.jsonl", *TRAIN, "--out", root / "run")[0] == 0
    return root


TRAIN = ("--max-steps", 2, "--batch-size", 2, "--eval-examples", 0, "--samples", 0, "--no-progress")


def _run(*args) -> tuple[int, str, str]:
    """``lorakit ARGS`` in-process; (exit code, stdout, stderr). An exception that escapes is a traceback: a bug."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _refused(*args) -> str:
    """The CLI must refuse with exit 2 and exactly one stderr line; returns it."""
    code, out, err = _run(*args)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy(root: Path, name: str) -> Path:
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / "plain", folder)
    return folder


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


class _Planted:
    """Unpickling this runs ``open(marker, 'w')``: a pickled weights file that tells whether it was ever loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sharded(root: Path, name: str) -> Path:
    folder = _copy(root, name)
    (folder / "model.safetensors").unlink()
    model, _ = lorakit.load_base(str(root / "plain"), device="cpu")
    model.save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 3
    return folder


def test_a_sharded_folder_trains_generates_and_merges(root):
    folder = _sharded(root, "sharded")
    code, out, err = _run("generate", "--model", folder, "--max-new-tokens", 3, PROMPT)
    assert code == 0, err
    code, out, err = _run("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", root / "run-sh")
    assert code == 0, err
    code, out, err = _run("merge", "--model", folder, "--adapter", root / "run-sh" / "adapter", "--out",
                          root / "merged-sh", "--dtype", "fp32")
    assert code == 0, err
    code, out, err = _run("inspect", root / "run-sh" / "adapter")
    assert code == 0 and str(folder) in out, err


def test_a_shard_the_index_names_but_the_folder_lacks_is_named_before_loading(root):
    """An interrupted download: transformers' own error named a path, not the cause or the fix."""
    folder = _sharded(root, "sharded-missing")
    gone = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    gone.unlink()
    for command in (("generate", "--model", folder, PROMPT),
                    ("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", root / "run-missing"),
                    ("merge", "--model", folder, "--adapter", root / "run" / "adapter", "--out", root / "merged-missing")):
        line = _refused(*command)
        assert "model.safetensors.index.json" in line and gone.name in line and "download" in line, line
    assert not (root / "run-missing").exists() and not (root / "merged-missing").exists()


def test_an_index_that_is_not_json_names_the_index_file(root):
    folder = _sharded(root, "sharded-badindex")
    (folder / "model.safetensors.index.json").write_text("{oops")
    line = _refused("generate", "--model", folder, PROMPT)
    assert "model.safetensors.index.json" in line and "not valid JSON" in line, line


def test_a_folder_with_config_but_no_weights_says_so(root):
    folder = _copy(root, "no-weights")
    (folder / "model.safetensors").unlink()
    line = _refused("generate", "--model", folder, PROMPT)
    assert "no weights" in line and "model.safetensors" in line and "download the weights" in line, line
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))  # a GGUF beside config.json: how to convert it
    line = _refused("generate", "--model", folder, PROMPT)
    assert "model-Q4_K_M.gguf, a GGUF file" in line and "gguf_file='model-Q4_K_M.gguf'" in line, line


def test_pickled_weights_are_never_unpickled_and_the_fix_is_one_transformers_5_line(root, tmp_path):
    """pytorch_model.bin alone is refused; beside safetensors it is ignored. The planted pickle would write a file
    if anything unpickled it. The suggested conversion must run on transformers 5 (no safe_serialization)."""
    marker = tmp_path / "unpickled"
    only_bin = _copy(root, "bin-only")
    (only_bin / "model.safetensors").unlink()
    with open(only_bin / "pytorch_model.bin", "wb") as handle:
        pickle.dump(_Planted(marker), handle)
    line = _refused("generate", "--model", only_bin, PROMPT)
    assert "pytorch_model.bin" in line and "never unpickles" in line and "safe_serialization" not in line, line
    assert ".save_pretrained(" in line, line
    _refused("train", "--model", only_bin, "--data", root / "train.jsonl", *TRAIN, "--out", tmp_path / "run")
    _refused("merge", "--model", only_bin, "--adapter", root / "run" / "adapter", "--out", tmp_path / "merged")

    both = _copy(root, "bin-and-safetensors")
    shutil.copy(only_bin / "pytorch_model.bin", both)
    code, out, err = _run("merge", "--model", both, "--adapter", root / "run" / "adapter", "--out", tmp_path / "m2",
                          "--dtype", "fp32")
    assert code == 0, err
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()


def test_code_a_folder_asks_to_run_is_never_run_nor_offered(root, tmp_path, monkeypatch):
    """A tokenizer that needs its own Python (auto_map, no tokenizer.json): transformers asked "Do you wish to run
    the custom code? [y/N]" on a terminal, and a "y" ran it. lorakit refuses in one line and never prompts; a known
    model_type with an auto_map loads with transformers' own class, the folder's .py files unread."""
    marker = tmp_path / "ran"
    plant = f"open({str(marker)!r}, 'w').write('ran')\n"
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a, **k: asked.append(a) or "y")

    folder = _copy(root, "tokenizer-code")
    (folder / "tokenizer.json").unlink()
    _edit_json(folder / "tokenizer_config.json", lambda d: d.update(
        tokenizer_class="ChatGLMTokenizer", auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}))
    (folder / "tokenization_chatglm.py").write_text(plant)
    line = _refused("generate", "--model", folder, PROMPT)
    assert "tokenization_chatglm" in line and "never runs" in line and "give the folder a tokenizer.json" in line, line
    shutil.copy(root / "plain" / "tokenizer.json", folder)  # with one, the fix is to name the standard class
    line = _refused("generate", "--model", folder, PROMPT)
    assert "never runs" in line and '"tokenizer_class": "PreTrainedTokenizerFast"' in line, line
    _edit_json(folder / "tokenizer_config.json", lambda d: d.update(tokenizer_class="PreTrainedTokenizerFast"))
    code, out, err = _run("generate", "--model", folder, "--max-new-tokens", 2, PROMPT)
    assert code == 0, err

    known = _copy(root, "model-code")
    _edit_json(known / "config.json", lambda d: d.update(auto_map={"AutoConfig": "configuration_x.XConfig",
                                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"}))
    (known / "configuration_x.py").write_text(plant)
    (known / "modeling_x.py").write_text(plant)
    code, out, err = _run("generate", "--model", known, "--max-new-tokens", 2, PROMPT)
    assert code == 0, err
    assert not asked and not marker.exists()


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_a_dtype_of_auto_in_config_json_names_the_field(root, key):
    folder = _copy(root, f"dtype-auto-{key}")
    _edit_json(folder / "config.json", lambda d: (d.pop("torch_dtype", None), d.pop("dtype", None), d.update({key: "auto"})))
    line = _refused("generate", "--model", folder, PROMPT)
    assert f'"{key}": "auto"' in line and "bfloat16" in line and "config.json" in line, line


def test_a_tokenizer_json_alone_takes_its_eos_from_config_json(root, tmp_path):
    """Only tokenizer.json (no tokenizer_config.json, so no special tokens named): config.json's eos_token_id
    names the end token, as transformers' generate would use it."""
    folder = _copy(root, "tokenizer-json-only")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    end = tiny_tokenizer().convert_tokens_to_ids("<|im_end|>")
    _edit_json(folder / "config.json", lambda d: d.update(eos_token_id=end))
    (folder / "generation_config.json").unlink()  # (it names the Llama default, 2; a real folder's names the same)
    _, tokenizer = lorakit.load_base(str(folder), device="cpu")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    code, out, err = _run("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", tmp_path / "run")
    assert code == 0, err

    del_eos = _copy(root, "tokenizer-json-no-eos")  # and without any eos id: the message says where to add one
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (del_eos / name).unlink(missing_ok=True)
    _edit_json(del_eos / "config.json", lambda d: d.pop("eos_token_id", None))
    (del_eos / "generation_config.json").unlink()
    line = _refused("generate", "--model", del_eos, PROMPT)
    assert "no tokenizer_config.json" in line and "eos_token" in line, line


def test_a_chat_template_in_chat_template_json_is_used_and_kept(root, tmp_path):
    """Processor-era folders keep the template in chat_template.json, which transformers 5's tokenizer does not
    read: generation ran without the template and the merged folder lost it."""
    folder = _copy(root, "template-json")
    template = tiny_tokenizer().chat_template
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    _edit_json(folder / "tokenizer_config.json", lambda d: d.pop("chat_template", None))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    _, tokenizer = lorakit.load_base(str(folder), device="cpu")
    assert tokenizer.chat_template == template
    code, out, err = _run("merge", "--model", folder, "--adapter", root / "run" / "adapter", "--out",
                          tmp_path / "merged", "--dtype", "fp32")
    assert code == 0, err
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == template


def test_a_generation_config_that_is_not_json_is_said_not_skipped_in_silence(root):
    """transformers drops an unreadable generation_config.json without a word, and with it the model's extra stop
    ids; lorakit still loads the model but says so, naming the file."""
    folder = _copy(root, "genconfig-bad")
    (folder / "generation_config.json").write_text("{ not json")
    with pytest.warns(UserWarning, match=r"generation_config.json is not valid JSON \(line 1: .*\), so it is ignored"):
        code, out, err = _run("generate", "--model", folder, "--max-new-tokens", 2, PROMPT)  # the CLI: "warning: ..."
    assert code == 0, err


def test_a_generation_config_with_several_eos_ids_stops_on_each(root):
    from lorakit.generation import end_of_turn_ids

    folder = _copy(root, "genconfig-eos")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 5, 7], "bos_token_id": 1}))
    model, tokenizer = lorakit.load_base(str(folder), device="cpu")
    assert {3, 5, 7} <= set(end_of_turn_ids(tokenizer, model))


def test_a_vision_language_folder_says_how_to_train_its_text_model(root, tmp_path):
    import transformers as tf

    folder = tmp_path / "llava"
    config = tf.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32),
        image_token_index=35)
    tf.LlavaForConditionalGeneration(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    line = _refused("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", tmp_path / "run")
    assert "'llava' is a vision-language model" in line and "'llama' causal LM" in line, line
    assert "lm.model, lm.lm_head = vl.model.language_model, vl.lm_head" in line, line
    assert not (tmp_path / "run").exists()

    # the recipe, as written in the line, gives a folder lorakit trains on
    vl = tf.AutoModelForImageTextToText.from_pretrained(folder)
    lm = tf.AutoModelForCausalLM.from_config(vl.config.text_config)
    lm.model, lm.lm_head = vl.model.language_model, vl.lm_head
    lm.save_pretrained(tmp_path / "text")
    tiny_tokenizer().save_pretrained(tmp_path / "text")
    code, out, err = _run("train", "--model", tmp_path / "text", "--data", root / "train.jsonl", *TRAIN, "--out",
                          tmp_path / "run")
    assert code == 0, err


def test_the_text_model_recipe_names_where_the_class_keeps_it(root, tmp_path):
    """SmolVLM (as Idefics 3) keeps its Llama under model.text_model, not model.language_model: the recipe says so.
    The refusal comes from config.json alone (no weights needed)."""
    import transformers as tf

    folder = tmp_path / "smolvlm"
    tf.SmolVLMConfig(text_config=dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                     vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=28, patch_size=14)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    line = _refused("generate", "--model", folder, PROMPT)
    assert "'smolvlm' is a vision-language model" in line and "vl.model.text_model, vl.lm_head" in line, line


def test_a_folder_path_with_spaces_and_unicode_works_end_to_end(root, tmp_path):
    folder = tmp_path / "my models" / "ünïcødé 模型"
    shutil.copytree(root / "plain", folder)
    run = tmp_path / "runs é" / "one"
    code, out, err = _run("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", run)
    assert code == 0, err
    code, out, err = _run("generate", "--model", folder, "--adapter", run / "adapter", "--max-new-tokens", 2, PROMPT)
    assert code == 0, err
    code, out, err = _run("merge", "--model", folder, "--adapter", run / "adapter", "--out", tmp_path / "merged ü",
                          "--dtype", "fp32")
    assert code == 0, err
    code, out, err = _run("inspect", run / "adapter")
    assert code == 0 and str(folder) in out, err


def test_config_json_given_for_the_folder_names_the_folder(root):
    line = _refused("generate", "--model", root / "plain" / "config.json", PROMPT)
    assert f"did you mean its folder {str(root / 'plain')!r}" in line, line


def test_merge_into_a_folder_holding_other_files_says_so_first(root):
    """It said 'already exists ... or pass --overwrite', and --overwrite then refused because of the other files:
    two tries to learn one thing. The first refusal names the files and does not offer --overwrite."""
    out = root / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    line = _refused("merge", "--model", root / "plain", "--adapter", root / "run" / "adapter", "--out", out)
    assert "notes.txt" in line and "--overwrite" not in line, line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_merge_into_a_read_only_folder_is_refused_before_loading(root, monkeypatch):
    """Root passes permission bits, so as root the kernel's refusal is stood in for by refusing mkdir there."""
    parent = root / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == parent:
                raise PermissionError(13, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        line = _refused("merge", "--model", root / "plain", "--adapter", root / "run" / "adapter", "--out",
                        parent / "merged")
        assert "cannot write" in line or "no permission" in line, line
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_a_tied_bf16_folder_trains_and_merges_to_the_same_logits(root, tmp_path):
    """tie_word_embeddings true and "torch_dtype": "bfloat16" in config.json: lorakit still loads float32 on CPU,
    and the merged folder reads back in transformers alone with base + adapter's logits."""
    from transformers import AutoModelForCausalLM

    from conftest import assert_close, tiny_llama

    folder = tmp_path / "tied"
    tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
               tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    code, out, err = _run("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--lr", 0.05,
                          "--out", tmp_path / "run")
    assert code == 0, err
    code, out, err = _run("merge", "--model", folder, "--adapter", tmp_path / "run" / "adapter", "--out",
                          tmp_path / "merged", "--dtype", "fp32")
    assert code == 0, err
    model, _ = lorakit.load_base(str(folder), device="cpu")
    assert model.dtype == torch.float32
    lorakit.load_adapter(model, str(tmp_path / "run" / "adapter"))
    ids = torch.tensor([[1, 7, 10, 11, 8, 3]])
    with torch.no_grad():
        expected = model(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert_close(merged, expected)


def test_named_chat_templates_survive_merge_and_gguf_export(root, tmp_path):
    """tokenizer_config.json may hold a list of named templates (Command-R, Hermes 2 Pro: "default", "tool_use"),
    which transformers reads as a dict. GGUF export handed that dict to gguf's writer, which iterates a list of
    {"name", "template"} entries: AttributeError ('str' object has no attribute 'get'), a traceback."""
    import gguf
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from test_gguf_architectures import qwen_tokenizer
    from test_serve_support import CHATML, make_adapter

    tokenizer = qwen_tokenizer()
    folder = tmp_path / "named"
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tool_use = CHATML + "{# tools #}"
    _edit_json(folder / "tokenizer_config.json", lambda d: d.update(
        chat_template=[{"name": "default", "template": CHATML}, {"name": "tool_use", "template": tool_use}]))
    adapter = make_adapter(base, tmp_path / "adapter", seed=1)
    code, out, err = _run("merge", "--model", folder, "--adapter", adapter, "--out", tmp_path / "merged",
                          "--format", "gguf", "--dtype", "fp32")
    assert code == 0, err
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == {"default": CHATML, "tool_use": tool_use}
    fields = gguf.GGUFReader(next((tmp_path / "merged").glob("*.gguf"))).fields
    assert fields["tokenizer.chat_template"].contents() == CHATML
    assert fields["tokenizer.chat_template.tool_use"].contents() == tool_use


def test_a_hugging_face_cache_entry_names_its_snapshot_and_the_snapshot_loads(root, tmp_path):
    """``hf download`` without --local-dir leaves models--org--name/snapshots/<commit>/ of links into blobs/; the
    entry itself has no config.json. The refusal names the snapshot to pass, and that folder (links) works."""
    entry = tmp_path / "hub" / "models--org--tiny"
    snapshot = _cache_entry(root / "plain", entry)
    line = _refused("generate", "--model", entry, PROMPT)
    assert "Hugging Face cache entry" in line and line.endswith(str(snapshot)), line
    code, out, err = _run("merge", "--model", snapshot, "--adapter", root / "run" / "adapter", "--out",
                          tmp_path / "merged", "--dtype", "fp32")
    assert code == 0, err
    assert not any(p.is_symlink() for p in (tmp_path / "merged").iterdir())  # real files, not links into the cache


def test_a_sentencepiece_only_tokenizer_without_the_package_names_the_package(root, tmp_path):
    """Older Llama 2 / Mistral folders ship tokenizer.model (SentencePiece) without tokenizer.json. Without the
    sentencepiece package transformers logged a paragraph and then said "`tiktoken` is required", the wrong package."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed here: the folder's tokenizer.model is read by it")
    folder = _copy(root, "sentencepiece-only")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02" + bytes(range(256)) * 8)
    _edit_json(folder / "tokenizer_config.json", lambda d: d.update(tokenizer_class="LlamaTokenizer"))
    line = _refused("generate", "--model", folder, PROMPT)
    assert "pip install sentencepiece" in line and "tokenizer.model" in line and "tiktoken" not in line, line


def test_a_merged_folder_names_no_code_it_does_not_hold(root, tmp_path):
    """Hub folders such as Phi-3 mini carry an auto_map (configuration_phi3.py, modeling_phi3.py) for a model_type
    transformers has built in. lorakit loads them with transformers' class, and the merged folder kept the auto_map
    without the .py files: from_pretrained(merged, trust_remote_code=True), as such model cards say to load,
    failed with "does not appear to have a file named configuration_x.py"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _copy(root, "auto-map")
    _edit_json(folder / "config.json", lambda d: d.update(auto_map={"AutoConfig": "configuration_x.XConfig",
                                                                    "AutoModelForCausalLM": "modeling_x.XForCausalLM"}))
    _edit_json(folder / "tokenizer_config.json", lambda d: d.update(
        auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]}))
    for name in ("configuration_x.py", "modeling_x.py", "tokenization_x.py"):
        (folder / name).write_text("raise SystemExit('the folder code ran')\n")
    out = tmp_path / "merged"
    code, _, err = _run("merge", "--model", folder, "--adapter", root / "run" / "adapter", "--out", out, "--dtype", "fp32")
    assert code == 0, err
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    AutoTokenizer.from_pretrained(out, trust_remote_code=True)

    code, _, err = _run("quantize", "--model", folder, "--out", tmp_path / "nf4")  # the 4-bit folder alike
    assert code == 0, err
    assert "auto_map" not in json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert "auto_map" not in json.loads((tmp_path / "nf4" / "tokenizer_config.json").read_text())


def _cache_entry(source: Path, entry: Path) -> Path:
    """``source`` laid out as the Hugging Face cache does: snapshots/<commit>/NAME are links to ../../blobs/<sha256>."""
    import hashlib

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (entry / "blobs").mkdir()
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    for file in source.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, entry / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


def test_qlora_and_quantize_read_a_sharded_model_from_the_hugging_face_cache(root, tmp_path):
    """The 4-bit loader refused every shard of a cached model ("shard ... is not a file inside"): it resolved the
    snapshot's links into blobs/ and then found them outside the folder. A shard name that leaves the folder is
    still refused."""
    snapshot = _cache_entry(_sharded(root, "sharded-cached"), tmp_path / "models--org--tiny")
    code, out, err = _run("train", "--model", snapshot, "--quantize", "nf4", "--data", root / "train.jsonl", *TRAIN,
                          "--out", tmp_path / "run")
    assert code == 0, err
    code, out, err = _run("quantize", "--model", snapshot, "--out", tmp_path / "nf4")
    assert code == 0, err

    outside = _sharded(root, "sharded-outside")
    index = json.loads((outside / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    shutil.copy(outside / index["weight_map"][key], tmp_path / "elsewhere.safetensors")
    index["weight_map"][key] = "../elsewhere.safetensors"
    shutil.copy(tmp_path / "elsewhere.safetensors", root / "elsewhere.safetensors")
    (outside / "model.safetensors.index.json").write_text(json.dumps(index))
    line = _refused("quantize", "--model", outside, "--out", tmp_path / "nf4-outside")
    assert "../elsewhere.safetensors" in line and "inside" in line, line


def test_qlora_reads_model_safetensors_over_a_stale_index_as_transformers_does(root, tmp_path):
    """A folder with model.safetensors and a leftover index of shards it no longer has: the 16-bit load reads
    model.safetensors (transformers prefers it); the 4-bit loader followed the index and refused the folder."""
    folder = _copy(root, "stale-index")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    code, out, err = _run("train", "--model", folder, "--quantize", "nf4", "--data", root / "train.jsonl", *TRAIN,
                          "--out", tmp_path / "run")
    assert code == 0, err


def test_a_native_mistral_folder_is_named_as_such(tmp_path):
    """Mistral Nemo / Pixtral repositories hold only params.json, consolidated.safetensors and tekken.json."""
    folder = tmp_path / "nemo"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2}))
    (folder / "consolidated.safetensors").write_bytes(b"\x00" * 16)
    (folder / "tekken.json").write_text("{}")
    line = _refused("generate", "--model", folder, PROMPT)
    assert "native layout (params.json, consolidated.safetensors)" in line and "Hugging Face version" in line, line


def test_a_tied_checkpoint_whose_config_says_untied_names_the_flag(tmp_path):
    """A model saved tied (no lm_head.weight in the file, as Llama 3.2 1B and Qwen2.5 0.5B ship) with
    "tie_word_embeddings": false in config.json (hand-edited, or another tool's export) was only 'incomplete'."""
    from conftest import tiny_llama

    folder = tmp_path / "tied-flag"
    tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
               tie_word_embeddings=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    _edit_json(folder / "config.json", lambda d: d.update(tie_word_embeddings=False))
    line = _refused("generate", "--model", folder, PROMPT)
    assert "'lm_head.weight'" in line and '"tie_word_embeddings": true' in line, line
    _edit_json(folder / "config.json", lambda d: d.update(tie_word_embeddings=True))  # the fix it names works
    code, out, err = _run("generate", "--model", folder, "--max-new-tokens", 2, PROMPT)
    assert code == 0, err


LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:4f2b3b0d\nsize 9085657\n"


@pytest.mark.parametrize("name, text, words", [
    ("tokenizer.json", LFS, "tokenizer.json is a Git LFS pointer, not the file: run git lfs pull"),
    ("tokenizer.json", '{"version": "1.0", "model": {"ty', "tokenizer.json: not valid JSON (line 1: "),
    ("tokenizer_config.json", "{bad", "tokenizer_config.json: not valid JSON (line 1: "),
    ("config.json", LFS, "config.json is a Git LFS pointer, not the file"),
])
def test_a_tokenizer_or_config_file_that_is_a_pointer_or_cut_is_named(root, name, text, words):
    """A clone without git-lfs leaves pointers (Llama 3's tokenizer.json is an LFS file); transformers said
    "Expecting value: line 1 column 1 (char 0)" about no file in particular."""
    folder = _copy(root, f"broken-{name}-{len(text)}")
    (folder / name).write_text(text)
    line = _refused("generate", "--model", folder, PROMPT)
    assert words in line and "download" in line, line


def test_a_chat_template_that_is_not_jinja_is_named_as_such(root):
    """It said "the chat template refused these messages", as if the prompt were at fault."""
    folder = _copy(root, "template-syntax")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    line = _refused("generate", "--model", folder, PROMPT)
    assert "chat template is not valid Jinja (line 1: unexpected '}')" in line and "--no-chat" in line, line
    code, out, err = _run("generate", "--model", folder, "--no-chat", "--max-new-tokens", 2, PROMPT)
    assert code == 0, err
