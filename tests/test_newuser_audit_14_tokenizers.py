"""Fourteenth audit, as a demanding new user: what an adapter folder brings besides the adapter. transformers'
Trainer and trl save the tokenizer (its chat template, its added tokens) beside the adapter, and peft saves the
embedding and head whole when the vocabulary was resized for new tokens. ``lorakit merge`` used both; load_adapter,
generate and eval did not. Each test failed before its fix. Tiny random models; peft makes the adapters."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import assert_close
from test_serve_support import tiny_hf_folder

NEW = [f"<tool_{i}>" for i in range(8)]


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """A base folder, and a peft adapter trained on it resized for 8 new tokens (with its tokenizer); the peft model."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("resized")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.3)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(NEW)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(len(tokenizer))
    trained = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    trained.save_pretrained(root / "adapter")  # save_embedding_layers="auto": the resized embedding and head whole
    tokenizer.save_pretrained(root / "adapter")
    return model_dir, root / "adapter", trained.eval(), tokenizer


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([[3, 17, 42, len(tokenizer) - 1, 5, len(tokenizer) - 8]])


def test_load_adapter_resizes_a_plain_base_for_a_resized_vocabulary(resized):
    """load_adapter refused the adapter with 'resize the base (model.resize_token_embeddings(N))', which then failed
    as 'a full copy ... that differs' (a resize's new rows are random). Now it resizes the base and takes the saved
    embedding and head, as peft's load over a resized base does (a warning says so): peft's logits, new tokens too."""
    from transformers import AutoModelForCausalLM

    model_dir, adapter, trained, tokenizer = resized
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.warns(UserWarning, match=f"resized from {len(tokenizer) - 8} to {len(tokenizer)} tokens"):
        lorakit.load_adapter(model, adapter)
    with torch.no_grad():
        assert_close(model(_ids(tokenizer)).logits, trained(_ids(tokenizer)).logits, torch.float32)
    assert model.config.vocab_size == len(tokenizer)
    # a base that already holds an adapter is not resized (its LoRA may be on these rows): refused, untouched
    other = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.inject(other, lorakit.LoraConfig(r=2, target_modules=["k_proj"]), adapter="first")
    with pytest.raises(lorakit.LorakitError, match=f"resized to {len(tokenizer)} tokens: load it on the resized base it was saved with, or on a base holding no other"):
        lorakit.load_adapter(other, adapter, adapter="second")
    assert other.get_input_embeddings().weight.shape[0] == len(tokenizer) - 8


def test_a_failed_load_puts_the_resized_base_back(resized, tmp_path):
    """The resize happens before the adapter's own checks; one that fails then (here a LoRA tensor of the wrong
    shape) must leave the model as it was, as load_adapter promises: its embedding, head and vocab_size."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model_dir, adapter, _, tokenizer = resized
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(3, tensors[key].shape[1])
    save_file(tensors, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(lorakit.LorakitError, match="shape"):
        lorakit.load_adapter(model, broken)
    assert model.config.vocab_size == len(tokenizer) - 8 and not lorakit.adapter_names(model)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model.get_input_embeddings().num_embeddings == model.get_output_embeddings().out_features == len(tokenizer) - 8


def test_generate_and_eval_run_a_resized_vocabulary_adapter_with_its_tokenizer(resized, tmp_path, capsys):
    """lorakit generate --adapter and lorakit eval --adapter refused the folder (the resize advice, which a command
    cannot follow). Now both resize the base as merge does, and encode with the adapter folder's tokenizer: its new
    tokens are one id each (the base's tokenizer spells them out in pieces). generate's greedy answer is peft's."""
    from lorakit.cli import main

    model_dir, adapter, trained, tokenizer = resized
    prompt = f"hello {NEW[2]} world"
    assert main(["generate", "--model", str(model_dir), "--adapter", str(adapter), "--no-chat", "--max-new-tokens", "6",
                 "--dtype", "float32", prompt]) == 0
    said = capsys.readouterr().out
    assert f"resized from {len(tokenizer) - 8} to {len(tokenizer)} tokens" in said
    assert f"tokenizer and chat template: from {adapter}" in said
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert len(tokenizer) - 6 in ids[0].tolist()  # <tool_2>: one new id
    with torch.no_grad():
        theirs = trained.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                  pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode([t for t in theirs[0, ids.shape[1]:].tolist() if t != tokenizer.eos_token_id],
                              skip_special_tokens=True)
    assert answer.strip() and said.endswith(answer + "\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": f"{NEW[0]} the cat {NEW[1]} sat"}) + "\n")
    results = tmp_path / "eval.json"
    assert main(["eval", "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data), "--json",
                 str(results), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"resized from {len(tokenizer) - 8} to {len(tokenizer)} tokens" in said
    assert f"tokenizer and chat template: from {adapter}" in said
    counted = json.loads(results.read_text())["supervised_tokens"]
    assert counted <= len(tokenizer(f"{NEW[0]} the cat {NEW[1]} sat").input_ids) + 1


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} says, in short: {{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant says, in short:{% endif %}")


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A base folder, an adapter folder holding a tokenizer with another chat template (as trl saves it), and the
    base folder with that tokenizer instead of its own (what the adapter folder's run should equal)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_serve_support import make_adapter

    root = tmp_path_factory.mktemp("templated")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.3)
    bare = make_adapter(AutoModelForCausalLM.from_pretrained(model_dir), root / "bare", seed=3, std=0.1)
    adapter = shutil.copytree(bare, root / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(adapter)
    expected = root / "with-template"
    shutil.copytree(model_dir, expected)
    tokenizer.save_pretrained(expected)
    return model_dir, adapter, expected, bare


def test_generate_and_eval_use_the_adapter_folders_chat_template(templated, tmp_path, capsys):
    """lorakit generate --adapter and lorakit eval --adapter rendered chats with the base's template though the
    adapter folder holds the tokenizer it was trained with (lorakit merge already used it). Now the folder's
    tokenizer is used, said in one line: the answer and the loss are those of the base given that tokenizer."""
    from lorakit.cli import main

    model_dir, adapter, expected, bare = templated
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "the cat sat"},
                                             {"role": "assistant", "content": "on the mat"}]}) + "\n")
    runs = {}
    for name, model, folder in (("adapter", model_dir, adapter), ("expected", expected, bare)):
        assert main(["generate", "--model", str(model), "--adapter", str(folder), "--max-new-tokens", "8",
                     "--dtype", "float32", "the cat sat"]) == 0
        answer = capsys.readouterr().out
        assert (f"tokenizer and chat template: from {adapter}" in answer) == (name == "adapter")
        assert main(["eval", "--model", str(model), "--adapter", str(folder), "--data", str(data), "--json",
                     str(tmp_path / f"{name}.json"), "--no-progress"]) == 0
        capsys.readouterr()
        runs[name] = answer.splitlines()[-1], json.loads((tmp_path / f"{name}.json").read_text())["loss"]
    assert runs["adapter"] == runs["expected"]
    assert main(["eval", "--model", str(model_dir), "--adapter", str(bare), "--data", str(data), "--json",
                 str(tmp_path / "base.json"), "--no-progress"]) == 0  # the base's own template: another loss (the test can tell them apart)
    assert json.loads((tmp_path / "base.json").read_text())["loss"] != runs["adapter"][1]


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_adapter_tokenizer_larger_than_the_model_is_refused_in_one_line(templated, tmp_path, capsys, command):
    """An adapter folder whose tokenizer has more tokens than the model's embedding rows (trained on a resized base
    that is not this one): its ids would index past the embedding. Refused in one line, as merge does."""
    import shutil

    from transformers import AutoTokenizer

    from lorakit.cli import main

    model_dir, adapter = templated[:2]
    bigger = tmp_path / "adapter"
    shutil.copytree(adapter, bigger)
    tokenizer = AutoTokenizer.from_pretrained(bigger)
    tokenizer.add_tokens(NEW)
    tokenizer.save_pretrained(bigger)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "the cat sat"}) + "\n")
    extra = ["hello"] if command == "generate" else ["--data", str(data), "--no-progress"]
    assert main([command, "--model", str(model_dir), "--adapter", str(bigger), *extra]) == 2
    err = capsys.readouterr().err
    assert f"has {len(tokenizer)} tokens but the model's embedding only {len(tokenizer) - 8} rows" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("size", ["5 gigs", 0, True])
def test_save_quantized_refuses_a_shard_size_that_is_not_one_in_one_line(tmp_path, size):
    """lorakit.save_quantized(..., max_shard_size="5 gigs") raised huggingface_hub's raw ValueError from deep in the
    write (0 and True were taken and wrote a folder); the merge and quantize commands already said it in one line. Now the
    function does too, before any work, and writes nothing."""
    from conftest import tiny_llama

    model = lorakit.quantize(tiny_llama(seed=1), "nf4")
    with pytest.raises(lorakit.LorakitError, match=r"^max_shard_size .* is not a size; give bytes or a number with KB"):
        lorakit.save_quantized(model, None, tmp_path / "out", progress=False, max_shard_size=size)
    assert not (tmp_path / "out").exists()


def test_the_server_never_resizes_its_shared_base_for_one_adapter(resized, tmp_path):
    """load_adapter now resizes a base holding no adapters for a resized-vocabulary adapter; the server's first
    adapter would have resized the base every request shares (other adapters and the plain base would then sample
    the new tokens). The pool loads with resize_vocabulary=False: the adapter is refused in one line, base untouched."""
    import shutil
    import threading

    from transformers import AutoModelForCausalLM

    from lorakit.serve.pool import AdapterPool, AdapterRejected

    model_dir, adapter, _, tokenizer = resized
    shutil.copytree(adapter, tmp_path / "adapters" / "tools")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pool = AdapterPool(model, tmp_path / "adapters", threading.RLock())
    with pytest.raises(AdapterRejected, match=f"resized to {len(tokenizer)} tokens") as error:
        pool.acquire("tools")
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == len(tokenizer) - 8
