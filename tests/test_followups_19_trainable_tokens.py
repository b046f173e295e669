"""peft's TrainableTokens method (``peft_type: "TRAINABLE_TOKENS"``) in lorakit (followups 19).

A folder saved by ``peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[...])`` (new special
tokens' rows trained, nothing else) was refused by every command ("peft_type 'TRAINABLE_TOKENS' is not LoRA"). It
loads now as token rows and no LoRA layer, through the token-row path of LoRA files with trainable_token_indices:
peft's logits (PeftModel.from_pretrained), element by element on float32, for untied and tied embeddings and a
head's own rows; ``lorakit merge`` writes the rows as peft's merge_and_unload does; ``lorakit inspect`` says what it
is; the static decoder refuses it as it refuses LoRA's token rows; hostile files get one line.

Also here: LoRA's ``trainable_token_indices={"lm_head": [...]}`` on a tied model wrote the head's rows into the
embedding too (lorakit spread any module's rows to every module sharing its weight; peft ties a head's rows to the
embedding's, never the reverse): logits 10.5 off peft's.
"""

from __future__ import annotations

import json
import re
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from cli_helpers import cli_error
from conftest import assert_close
from lorakit.cli import main
from lorakit.inject import lora_layers
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from model_helpers import logits
from test_peft_sweep import build, randomize_peft

ROWS = [3, 7, 50]
IDS = torch.tensor([[3, 7, 50, 11, 12, 3], [5, 50, 9, 7, 1, 2]])  # the trained rows are read by the prompts


@pytest.fixture(autouse=True)
def _references(monkeypatch):
    """The kernels' PyTorch references (their own tests cover the kernels); set per test, never for the session:
    set at import it turned the Triton path off for every test file collected with this one."""
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


def quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on tied embeddings, transformers' deprecations
        return call(*args, **kwargs)


def tokens_saved(kind: str, folder, targets=("embed_tokens",), indices=ROWS, model=None):
    """peft's TrainableTokens adapter on ``build(kind)`` (or ``model``), its rows moved off the base's (as training
    does), saved to ``folder``. Returns the in-memory PeftModel."""
    config = peft.TrainableTokensConfig(target_modules=list(targets), token_indices=list(indices))
    theirs = quiet(peft.get_peft_model, model if model is not None else build(kind), config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator))
    quiet(theirs.save_pretrained, folder)
    return theirs


def refused(folder, kind="llama") -> str:
    model = build(kind)
    with pytest.raises(lorakit.LorakitError) as error:
        lorakit.load_adapter(model, folder)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)
    return str(error.value)


def edit(folder, config=None, tensors=None):
    if config is not None:
        path = folder / CONFIG_NAME
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if tensors is not None:
        save_file(tensors(load_file(folder / WEIGHTS_NAME)), folder / WEIGHTS_NAME)


CASES = {  # (model, peft's target_modules)
    "untied": ("llama", ["embed_tokens"]),
    "tied": ("llama-tied", ["embed_tokens"]),  # peft saves the tied head's rows too, under lm_head
    "untied-embedding-and-head": ("llama", ["embed_tokens", "lm_head"]),  # two sets of rows, one each
    "head-of-a-tied-model": ("llama-tied", ["lm_head"]),  # the head's rows only: the embedding stays the base's
}


@pytest.mark.parametrize("case", CASES)
def test_trainable_tokens_load_and_merge_as_peft(case, tmp_path):
    kind, targets = CASES[case]
    tokens_saved(kind, tmp_path, targets)
    theirs = quiet(peft.PeftModel.from_pretrained, build(kind), tmp_path).eval()
    expected = logits(theirs, IDS)
    assert (expected - logits(build(kind), IDS)).abs().max() > 1e-1  # the rows change the model
    ours = build(kind)
    lorakit.load_adapter(ours, tmp_path)
    assert not lora_layers(ours)  # rows only: no LoRA layer anywhere
    assert_close(logits(ours, IDS), expected, msg=f"{case}: lorakit's load differs from peft's")
    with pytest.raises(lorakit.LorakitError, match=r"token_indices \[3, 7, 50\] load as whole copies .*trainable=True"):
        lorakit.load_adapter(build(kind), tmp_path, trainable=True)
    with pytest.raises(lorakit.LorakitError, match=r"it cannot be saved back as a peft adapter; its folder is the "):
        lorakit.save_adapter(ours, tmp_path / "again")  # a LoRA config of no target: peft would refuse to load it
    assert not (tmp_path / "again").exists()
    lorakit.merge_and_unload(ours)
    assert_close(logits(ours, IDS), expected, msg=f"{case}: lorakit's merge changes the logits")
    if case != "head-of-a-tied-model":  # peft's merge writes the head's rows into the weight it shares with the embedding
        merged = quiet(theirs.merge_and_unload)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(ours.get_parameter(name), merged.get_parameter(name), rtol=0, atol=0)


def test_rows_of_a_tied_head_are_not_the_embeddings_in_a_lora_file(tmp_path):
    """LoRA with trainable_token_indices naming the head alone of a tied model: peft trains and applies the head's
    rows only; lorakit also wrote them into the embedding (the module sharing the head's weight)."""
    theirs = quiet(peft.get_peft_model, build("llama-tied"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices={"lm_head": ROWS})).eval()
    randomize_peft(theirs)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.add_(1.0)
    quiet(theirs.save_pretrained, tmp_path)
    ours = build("llama-tied")
    lorakit.load_adapter(ours, tmp_path)
    assert_close(logits(ours, IDS), logits(theirs, IDS))


def test_token_indices_as_a_map_is_refused_as_peft_fails_on_it(tmp_path):
    """LoRA's trainable_token_indices may map embedding names to ids; TrainableTokensConfig's token_indices may not
    (peft itself fails on it), so lorakit refuses it in one line instead of guessing."""
    with pytest.raises(Exception):
        quiet(peft.get_peft_model, build("llama"), peft.TrainableTokensConfig(target_modules=["embed_tokens"],
                                                                              token_indices={"embed_tokens": ROWS}))
    tokens_saved("llama", tmp_path)
    edit(tmp_path, config=lambda c: {**c, "token_indices": {"embed_tokens": ROWS}})
    assert "token_indices is a map ({'embed_tokens': [3, 7, 50]}), but peft's TrainableTokensConfig takes one list" \
        in refused(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (dict(config=lambda c: {**c, "token_indices": [3, 7, 500]}),
     r"token_indices: model.embed_tokens has a delta of shape \(3, 32\) for 3 token ids up to 500; this model's "
     r"model.embed_tokens is \(100, 32\); ids past its 100 rows come from a resized vocabulary"),
    (dict(tensors=lambda t: {k: v[:2] for k, v in t.items()}),
     r"token_indices: model.embed_tokens has a delta of shape \(2, 32\) for 3 token ids up to 50"),
    (dict(tensors=lambda t: {"base_model.model.model.embed_tokens.weight_delta": v for v in t.values()}),
     r"peft_type TRAINABLE_TOKENS but the weights hold no trained rows \(keys ending in \.trainable_tokens_delta\)"),
    (dict(config=lambda c: {**c, "token_indices": [3, 7, 3]}),
     r"token_indices lists token id 3 more than once"),
    (dict(config=lambda c: {**c, "token_indices": [3, -7, 50]}), r"token_indices must be a list of token ids, got"),
    (dict(config=lambda c: {**c, "token_indices": []}), r"token_indices must be a list of token ids, got \[\]"),
    (dict(config=lambda c: {**c, "token_alpha": 2}), r"unknown field 'token_alpha'=2 for peft's TrainableTokens"),
], ids=["index-past-the-vocabulary", "delta-shape", "no-delta-tensor", "id-twice", "negative-id", "no-ids",
        "unknown-field"])
def test_hostile_files_are_refused_in_one_line(damage, message, tmp_path):
    tokens_saved("llama", tmp_path)
    edit(tmp_path, **damage)
    line = refused(tmp_path)
    assert re.search(message, line), line


def test_a_head_peft_wrapped_twice_is_refused_saying_why(tmp_path):
    """target_modules naming both the embedding and the head tied to it: peft nests a token layer in another and
    saves lm_head.base_layer.trainable_tokens_delta, a model its own forward cannot run."""
    tokens_saved("llama-tied", tmp_path, ["embed_tokens", "lm_head"])
    theirs = quiet(peft.PeftModel.from_pretrained, build("llama-tied"), tmp_path)
    with pytest.raises(ValueError, match="wraps an unknown layer type"):
        logits(theirs, IDS)
    message = refused(tmp_path, "llama-tied")
    assert "'base_model.model.lm_head.base_layer.trainable_tokens_delta' is a token layer peft nested" in message
    assert "train it again with the embedding alone in target_modules" in message


def test_config_alone_says_to_read_the_folder(tmp_path):
    tokens_saved("llama", tmp_path)
    with pytest.raises(lorakit.LorakitError, match=r"peft_type 'TRAINABLE_TOKENS' \(peft's TrainableTokens: trained rows "
                                                   r"of the embedding, no LoRA\) is read from its whole adapter folder"):
        lorakit.LoraConfig.from_peft_dict(json.loads((tmp_path / CONFIG_NAME).read_text()))


def test_static_decoder_and_server_copies(tmp_path):
    """The static decoder serves adapters on the attention and MLP projections only: it refuses rows on this one in
    its one line, as for LoRA's token rows. The server keeps only the trained rows of each copy (RowOverride), same
    logits, a few hundred bytes held."""
    from conftest import tiny_llama
    from lorakit.decoding import StaticDecoder
    from lorakit.serve.copies import compact_copies, held_bytes

    model = tiny_llama(seed=2, tie_word_embeddings=True)
    theirs = tokens_saved("", tmp_path, model=tiny_llama(seed=2, tie_word_embeddings=True))
    lorakit.load_adapter(model, tmp_path, adapter="rows")
    decoder = StaticDecoder(model, max_batch=2, max_len=8)
    assert decoder.unservable("rows") == ("adapter 'rows' also changes lm_head; the static decoder serves adapters on "
                                          "the attention and MLP projections only (use --decoder transformers)")
    assert sorted(compact_copies(model, "rows")) == ["lm_head", "model.embed_tokens"]
    assert held_bytes(model, "rows") == 2 * len(ROWS) * (32 * 4 + 8)  # rows (float32) and their ids, per module
    assert_close(logits(model, IDS), logits(theirs, IDS))


def test_cli_inspect_generate_and_merge(tmp_path, capsys):
    import httpx
    from test_serve_support import ServerProcess, tiny_hf_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_hf_folder(tmp_path / "base", initializer_range=0.5, tie_word_embeddings=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = tokenizer("a b c")["input_ids"][:3]  # the prompt's own tokens: their rows are trained
    adapter = tmp_path / "adapters" / "rows"
    theirs = tokens_saved("", adapter, indices=rows, model=AutoModelForCausalLM.from_pretrained(base))
    # inspect: what it is, without a rank or targets that describe nothing
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "method                trainable tokens only (no LoRA layers)" in out, out
    assert f"trainable tokens      {rows} (3 trained rows" in out and "rank" not in out, out
    assert "made by               peft TrainableTokens (TRAINABLE_TOKENS)" in out, out
    assert main(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"], info["rank"], info["trainable_tokens"]) == ("trainable_tokens", None, rows)
    # merge: peft's merged model, written by lorakit
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "ours"),
                 "--dtype", "fp32"]) == 0
    capsys.readouterr()
    peft_merged = quiet(theirs.merge_and_unload)
    ids = torch.tensor([rows + [5, 9, rows[0]], [40, rows[2], 7, rows[1], 300, 2]])
    assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ours"), ids), logits(peft_merged, ids))
    peft_merged.save_pretrained(tmp_path / "peft-merged")
    tokenizer.save_pretrained(tmp_path / "peft-merged")
    # generate with the adapter: the tokens of peft's merged model, not the base's
    answers = []
    for args in (["--model", str(base), "--adapter", str(adapter)], ["--model", str(tmp_path / "peft-merged")],
                 ["--model", str(base)]):
        assert main(["generate", *args, "--max-new-tokens", "6", "--no-chat", "a b c"]) == 0, capsys.readouterr().err
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] != answers[2], answers
    # serve: peft's greedy tokens over HTTP, holding the trained rows only (not two (vocab, dim) copies)
    prompt = rows + [5, 9]
    expected = []
    with torch.no_grad():
        for _ in range(4):
            expected.append(int(logits(theirs, torch.tensor([prompt + expected]))[0, -1].argmax()))
    process = ServerProcess(base, tmp_path / "adapters", "--decoder", "transformers", log=tmp_path / "server.log")
    try:
        with httpx.Client(base_url=process.url, timeout=60) as client:
            response = client.post("/v1/completions", json={"model": "rows", "prompt": prompt, "max_tokens": 4,
                                                            "temperature": 0})
            assert response.status_code == 200, response.text[:300]
            assert response.json()["choices"][0]["text"] == tokenizer.decode(expected)
            listed = {a["name"]: a for a in client.get("/v1/adapters").json()["data"]}
            assert listed["rows"]["memory_bytes"] == 2 * len(rows) * (32 * 4 + 8)  # embedding's and head's rows, ids
    finally:
        process.stop()
    # generate refuses a hostile file in one line, no traceback
    edit(adapter, config=lambda c: {**c, "token_indices": [3, 7, 100000]})
    line = cli_error(capsys, main(["generate", "--model", str(base), "--adapter", str(adapter), "a"]))
    assert re.search(r"rows: token_indices: (lm_head|model\.embed_tokens) has a delta of shape \(3, 32\) for 3 token "
                     r"ids up to 100000", line), line
