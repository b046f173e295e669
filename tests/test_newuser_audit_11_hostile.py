"""Eleventh new-user audit: hostile data files, adapter configs and server requests, and four design decisions.

Each test pins one finding (before the fix: a misleading line, a silently ignored request field, or a silent
mistake). The design decisions:

- ``alpha=0``: peft accepts ``lora_alpha=0`` (and negative alphas), so ``LoraConfig`` and ``lorakit train --alpha``
  both accept any finite alpha; an adapter with alpha 0 on every layer is a no-op (its gradients are zero too), so
  injecting or loading one is warned.
- a rank above ``min(in_features, out_features)`` of a targeted layer: accepted (peft does); injecting a trainable
  adapter warns once, naming a layer.
- a validation set whose every example is also a training example: warned (its loss cannot show overfitting).
- a ``config.json`` with a UTF-8 byte-order mark: transformers itself refuses it (``AutoConfig`` and so
  ``from_pretrained``: "not a valid JSON file"), so the folder would fail in every other tool too; it is refused with
  one line that names the mark and the fix, instead of Python's "decode using utf-8-sig". (``adapter_config.json``
  with a mark was and is read.)
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
import warnings

import httpx
import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.errors import LorakitError
from lorakit.train.sources import read_many
from test_serve_support import ServerProcess, make_adapter, tiny_hf_folder
from test_train_helpers import tiny_folder, tiny_tokenizer  # noqa: F401 (fixture)


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _warnings(call) -> tuple:
    """(what ``call()`` returns, the messages of the warnings it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught]


# -- data files -----------------------------------------------------------------------------------------------------
def test_a_csv_without_a_header_line_names_its_first_line(tmp_path):
    """The first data row was read as the header, and the error blamed row 2 for the user's own text as field names."""
    (tmp_path / "pairs.csv").write_text("reverse a b :,b a\ncopy a :,a\n")
    with pytest.raises(LorakitError) as info:
        read_many(tmp_path / "pairs.csv")
    assert re.fullmatch(r"pairs\.csv:1: the header line names no known field \('reverse a b :', 'b a'\); the first "
                        r"line of a CSV names its columns: text, or prompt and completion, or messages \(rename them, "
                        r"or add a header line if that line is data\)", _one_line(info)), str(info.value)
    # a header of other tools' names still gets its rename hint
    (tmp_path / "io.csv").write_text("input,output\nreverse a b :,b a\n")
    with pytest.raises(LorakitError, match=r"rename 'input' to 'prompt' and 'output' to 'completion'"):
        read_many(tmp_path / "io.csv")


def test_a_utf32_file_with_its_byte_order_mark_reads(tmp_path):
    """UTF-32's mark starts with UTF-16's: the file was decoded as UTF-16 and refused as 'UTF-16 without a mark'."""
    record = {"prompt": "reverse a b : ", "completion": "b a é"}
    for codec in ("utf-32", "utf-32-be"):
        data = json.dumps(record, ensure_ascii=False).encode(codec)
        (tmp_path / "u32.jsonl").write_bytes(codecs.BOM_UTF32_BE + data if codec == "utf-32-be" else data)
        assert [dict(r.fields) for r in read_many(tmp_path / "u32.jsonl")] == [record]


def test_a_text_part_whose_text_is_not_a_string_says_so():
    """It was told it 'is a 'text' part; lorakit trains on text only', which is what it already is."""
    from lorakit.train.formats import validate_record

    user = {"role": "user", "content": "reverse a"}
    for text, got in ((5, r"got int 5; write it as a JSON string \(\"5\"\)"), (None, "got null")):
        record = {"messages": [user, {"role": "assistant", "content": [{"type": "text", "text": text}]}]}
        with pytest.raises(LorakitError) as info:
            validate_record(record, "chat.jsonl:3")
        assert re.fullmatch(rf"chat\.jsonl:3: messages\[1\] \(assistant\) content\[0\] is a 'text' part whose 'text' "
                            rf"must be a string, {got}", _one_line(info)), str(info.value)


def test_a_null_cell_in_a_parquet_file_is_named_as_null(tmp_path):
    """A missing value in a Parquet text column was reported as 'no known field in []' (the null cell is dropped as
    an absent column, then the row had no fields at all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["reverse a", None]}), tmp_path / "gaps.parquet")
    with pytest.raises(LorakitError) as info:
        read_many(tmp_path / "gaps.parquet")
    assert _one_line(info) == "gaps.parquet row 1: 'text' is null (an empty cell); fill it or drop the row"
    # a column another record shape fills stays absent where it is null (mixed shapes in one table)
    pq.write_table(pa.table({"text": ["reverse a", None], "prompt": [None, "copy a : "], "completion": [None, "a"]}),
                   tmp_path / "mixed.parquet")
    assert [r.shape for r in read_many(tmp_path / "mixed.parquet")] == ["text", "prompt_completion"]


def test_a_validation_set_inside_the_training_set_is_warned():
    """lorakit train --data train.jsonl --val-data train.jsonl (and train() from Python) trained without a word."""
    from lorakit.train import TrainConfig, train
    from test_train_helpers import task_records

    records = task_records(12, seed=1)
    config = TrainConfig(rank=2, batch_size=4, max_steps=1, eval_examples=0, progress=False, save_every=0)

    def run(validation):
        model = tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=1)
        return _warnings(lambda: train(model, tiny_tokenizer(), records, config, val_data=validation,
                                       log=lambda line: None))[1]

    said = ("validation data: all {} examples are also in the training data (the same file given twice?), so the "
            "validation loss cannot show overfitting; hold out examples the model does not train on (--val-fraction 0.1)")
    assert run(records) == [said.format(12)]
    assert run(records[:3]) == [said.format(3)]  # a subset is the same mistake
    assert run(task_records(4, seed=2) + records[:3]) == []  # held-out examples: nothing to say


# -- LoRA settings --------------------------------------------------------------------------------------------------
def test_alpha_zero_is_accepted_with_a_warning_by_the_api_and_the_cli(tmp_path):
    """peft accepts lora_alpha=0 (and negative); the CLI refused --alpha 0 that LoraConfig accepted silently."""
    from lorakit.train.config import TrainConfig

    noop = ("adapter {!r} has alpha 0 on every layer it adapts, so it changes nothing (the update is scaled by alpha "
            "/ r) and training it learns nothing; give a positive alpha, e.g. 2 x r")
    assert TrainConfig(alpha=0).lora_config().alpha == 0 == lorakit.LoraConfig(r=8, alpha=0).alpha
    assert TrainConfig(alpha=-16).lora_config().alpha == -16 == lorakit.LoraConfig(r=8, alpha=-16).alpha
    with pytest.raises(LorakitError, match=r"--alpha must be a finite number \(e\.g\. 2 x --rank\), got nan"):
        TrainConfig(alpha=float("nan"))
    model = tiny_llama()
    _, messages = _warnings(lambda: lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=0), adapter="zero"))
    assert messages == [noop.format("zero")]
    _, messages = _warnings(lambda: lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=0, alpha_pattern={"q_proj": 8}),
                                                   adapter="some"))
    assert messages == []  # q_proj's update is not zero
    _, messages = _warnings(lambda: lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=0, variant="dora"), adapter="d"))
    assert messages == []  # DoRA's magnitudes still learn
    # an adapter saved with lora_alpha 0 (peft writes such files) loads, and says it is a no-op
    folder = make_adapter(tiny_llama(), tmp_path / "zero", seed=1)
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "lora_alpha": 0}))
    _, messages = _warnings(lambda: lorakit.load_adapter(tiny_llama(), folder))
    assert messages == [noop.format("default")]


def test_a_rank_above_a_targeted_layers_size_is_warned_once_naming_it():
    """tiny Llama: k_proj / v_proj are 32 -> 16, so rank 20 there can only reach 16 (peft accepts it silently)."""
    model, messages = _warnings(lambda: lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=20, target_modules="all-linear")))
    assert messages == [
        "r=20 is above min(in_features, out_features) of model.layers.0.self_attn.k_proj (32 -> 16) and 3 other "
        "targeted layer(s): the update there has rank at most 16, so the extra rank only adds parameters; lower r "
        "or give those layers rank_pattern"]
    assert lorakit.adapter_names(model) == ["default"]
    _, messages = _warnings(lambda: lorakit.inject(tiny_llama(), lorakit.LoraConfig(
        r=20, target_modules="all-linear", rank_pattern={"k_proj|v_proj": 8})))
    assert messages == []



def test_pissa_with_a_rank_above_a_layers_size_is_refused_before_any_weight_changes():
    """PiSSA takes a layer's top-r singular vectors; k_proj (32 -> 16) has 16. It failed with a RuntimeError (size of
    tensor a (20) must match ... b (16)) after q_proj's base weight had been rewritten, and the rollback removed the
    adapter but left that weight changed: the base was silently corrupted."""
    model = tiny_llama()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(LorakitError) as info:
        lorakit.inject(model, lorakit.LoraConfig(r=20, init="pissa", target_modules=["q_proj", "k_proj"]))
    assert _one_line(info) == (
        "init='pissa' takes r of a layer's top singular vectors, and model.layers.0.self_attn.k_proj (32 -> 16) has "
        "only 16 (r=20); lower r, or give those layers a smaller rank_pattern")
    assert lorakit.adapter_names(model) == [] and model.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_the_pair_load_base_returns_is_named_where_a_model_goes(tmp_path):
    """model = lorakit.load_base(...) keeps (model, tokenizer); every call then failed with AttributeError "'tuple'
    object has no attribute '__dict__'"."""
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "a", seed=1)
    pair = (model, None)
    calls = {"inject": lambda: lorakit.inject(pair, lorakit.LoraConfig(r=4)),
             "load_adapter": lambda: lorakit.load_adapter(pair, folder),
             "save_adapter": lambda: lorakit.save_adapter(pair, tmp_path / "out"),
             "merge": lambda: lorakit.merge(pair), "set_adapter": lambda: lorakit.set_adapter(pair, "default"),
             "trainable_report": lambda: lorakit.trainable_report(pair),
             "quantize": lambda: lorakit.quantize(pair), "dequantize": lambda: lorakit.dequantize(pair)}
    for name, call in calls.items():
        with pytest.raises(LorakitError) as info:
            call()
        assert _one_line(info) == ("expected the model (a torch.nn.Module), got a tuple; lorakit.load_base returns "
                                   "(model, tokenizer): unpack it with model, tokenizer = lorakit.load_base(...)"), name
    with pytest.raises(LorakitError, match=r"^expected the model \(a torch.nn.Module\), got str 'smollm2-135m'; load it "
                                           r"first: model, tokenizer = lorakit.load_base\('smollm2-135m'\)$"):
        lorakit.inject("smollm2-135m", lorakit.LoraConfig(r=4))
    assert not (tmp_path / "out").exists() and lorakit.adapter_names(model) == []

# -- model folders --------------------------------------------------------------------------------------------------
def test_a_config_json_with_a_byte_order_mark_names_the_mark(tiny_folder, tmp_path):  # noqa: F811 (fixture)
    folder = tmp_path / "bom-model"
    shutil.copytree(tiny_folder, folder)
    (folder / "config.json").write_bytes(codecs.BOM_UTF8 + (folder / "config.json").read_bytes())
    with pytest.raises(LorakitError) as info:
        lorakit.load_base(str(folder))
    assert _one_line(info) == (
        f"{folder / 'config.json'}: starts with a UTF-8 byte-order mark (what some Windows editors write), which "
        "transformers cannot read; save it as UTF-8 without the mark (e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' config.json)")


# -- the server -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hostile11")
    model_dir = tiny_hf_folder(root / "model")
    make_adapter(AutoModelForCausalLM.from_pretrained(model_dir), root / "adapters" / "a0", seed=1)
    server = ServerProcess(model_dir, root / "adapters", "--max-tokens", "16", log=root / "server.log")
    client = httpx.Client(base_url=server.url, timeout=60)
    try:
        yield client
    finally:
        client.close()
        server.stop()


def test_top_logprobs_without_logprobs_is_refused(server):
    """It was answered without any logprobs: the field asked for was dropped silently (OpenAI refuses it)."""
    body = {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_logprobs": 3}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "top_logprobs" and error["message"] == "top_logprobs needs logprobs: true; send both"
    # what clients send as "off" values still passes, and the asked-for logprobs still come back
    assert server.post("/v1/chat/completions", json={**body, "top_logprobs": 0}).status_code == 200
    reply = server.post("/v1/chat/completions", json={**body, "logprobs": True}).json()
    assert all(len(entry["top_logprobs"]) == 3 for entry in reply["choices"][0]["logprobs"]["content"])



def test_a_prompt_that_fills_the_context_without_max_tokens_names_the_prompt(server):
    """It was blamed on 'max_tokens (1)', a field the client never sent."""
    response = server.post("/v1/completions", json={"model": "a0", "prompt": [65] * 256})  # the context is 256
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    assert error["message"] == ("the prompt (256 tokens) fills the model's context of 256 tokens, leaving no room for "
                                "an answer; shorten it")
    assert server.post("/v1/completions", json={"model": "a0", "prompt": [65] * 255}).json()["usage"] == {
        "prompt_tokens": 255, "completion_tokens": 1, "total_tokens": 256}


@pytest.mark.parametrize("key, env, words", [
    ("", None, "--api-key is empty (an unset shell variable? $LORAKIT_API_KEY set to ''?)"), (None, "", "--api-key is empty"),
    ("secret\n", None, "--api-key starts or ends with whitespace (a newline from a key file?), which a client's "
                      "Authorization header cannot carry"),
])
def test_serve_refuses_an_api_key_no_client_can_send(key, env, words, tiny_folder, tmp_path, capsys, monkeypatch):  # noqa: F811
    """--api-key "$KEY" with KEY unset served with no key at all (open to anyone on --host 0.0.0.0), and a key
    ending in a newline was one no request could match (HTTP strips header values)."""
    from lorakit.cli import main

    (tmp_path / "adapters").mkdir()
    if env is not None:
        monkeypatch.setenv("LORAKIT_API_KEY", env)
    args = ["serve", "--model", str(tiny_folder), "--adapters", str(tmp_path / "adapters"), "--port", "0"]
    assert main(args + (["--api-key", key] if key is not None else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorakit serve: error: " + words) and "secret" not in err[0], err


@pytest.mark.parametrize("origin, fix", [("localhost:3000", "http://localhost:3000"),
                                         ("http://localhost:3000/", "http://localhost:3000"),
                                         ("https://app.example.com/chat", "https://app.example.com")])
def test_serve_refuses_a_cors_origin_no_browser_sends(origin, fix, tiny_folder, tmp_path, capsys):  # noqa: F811
    """A browser's Origin header is scheme://host[:port] exactly; any other form was accepted and then matched no
    request, so the page's calls were refused with 'Disallowed CORS origin' and nothing named the flag's mistake."""
    from lorakit.cli import main

    (tmp_path / "adapters").mkdir()
    args = ["serve", "--model", str(tiny_folder), "--adapters", str(tmp_path / "adapters"), "--port", "0"]
    assert main(args + ["--cors-origin", "*", "--cors-origin", origin]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lorakit serve: error: --cors-origin {origin!r} is not an origin as a browser sends it "
                   f"(scheme://host[:port], no path or trailing slash), so no request would match it; did you mean "
                   f"{fix!r}?"], err

# -- the command line -----------------------------------------------------------------------------------------------
def test_lorakit_train_prints_a_warning_as_one_plain_line(tiny_folder, tmp_path):  # noqa: F811 (fixture)
    """lorakit train showed Python's developer form: 'lorakit/train/loop.py:264: UserWarning: ...' and then the
    source line 'inject(model, config.lora_config())'; the other commands said 'warning: ...'."""
    from test_train_helpers import run_cli, task_records, write_jsonl

    data = write_jsonl(tmp_path / "two.jsonl", task_records(2, seed=1))  # one step of one batch: seconds
    done = run_cli("train", "--model", str(tiny_folder), "--data", str(data), "--alpha", "0", "--batch-size", "2",
                   "--max-steps", "1", "--eval-examples", "0", "--out", str(tmp_path / "run"), "--no-progress")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith("warning: adapter 'default' has alpha 0 on every layer it adapts") for line in lines)
    assert "UserWarning" not in done.stderr and "lora_config())" not in done.stderr, done.stderr
