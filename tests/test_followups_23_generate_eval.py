"""`lorakit generate` / `lorakit eval` and model.generate(adapter_names=...) as a new user runs them, on a tiny random
Llama with a real (byte-level BPE) tokenizer: greedy answers equal transformers' own generate on the merged weights,
eval's loss is the hand-computed mean cross-entropy, and the mistakes found in this audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.cli import main
from lorakit.errors import LorakitError
from test_serve_support import tiny_folder_with_adapters


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return tiny_folder_with_adapters(tmp_path_factory.mktemp("generate_eval"))


def _merged(hf, adapter):
    model, _ = lorakit.load_base(str(hf["model"]))
    lorakit.load_adapter(model, str(adapter))
    return lorakit.merge_and_unload(model).eval()


def test_a_generation_prints_on_a_terminal_that_is_not_utf8(hf, tmp_path):
    """Model text (here: U+FFFD of cut byte sequences, and the emoji of the prompt's echo-free answer) printed to an
    ASCII stdout (PYTHONIOENCODING, a C locale, a Windows console) ended in a UnicodeEncodeError traceback after the
    whole generation had run; the characters the encoding lacks are now escaped, as Python's stderr does."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "LORAKIT_DISABLE_TRITON": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(lorakit.__file__).parent.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "lorakit", "generate", "--model", str(hf["model"]), "--max-new-tokens",
                           "8", "Hello there \U0001f389"], capture_output=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr.decode("ascii", "replace")[-2000:]
    assert b"Traceback" not in done.stderr
    out = done.stdout.decode("ascii")  # escaped, so plain ASCII
    # the same answer as on a UTF-8 terminal, escaped where ASCII lacks the characters
    tokenizer = AutoTokenizer.from_pretrained(hf["model"])
    model = AutoModelForCausalLM.from_pretrained(hf["model"])
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello there \U0001f389"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    assert any(ord(c) > 127 for c in text)  # the case this test is about
    assert out.rstrip("\n") == text.encode("ascii", "backslashreplace").decode("ascii")


def test_generate_adapter_names_must_name_every_prompt(hf):
    """model.generate(adapter_names=[...]) with fewer names than prompts ran the one name on every row without a word
    (mixed_batch spreads k x len(names) rows k to a name, for beams); peft refuses it, and so does lorakit now. One
    name per prompt still gives each row what it gives alone, beams included."""
    tokenizer = AutoTokenizer.from_pretrained(hf["model"])
    tokenizer.padding_side = "left"
    model, _ = lorakit.load_base(str(hf["model"]))
    for adapter in hf["adapters"]:
        lorakit.load_adapter(model, str(adapter), adapter=adapter.name)
    prompts = ["Hello there, what is the capital of France?", "Hi"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    with pytest.raises(LorakitError, match="adapter_names has 1 names for 2 prompts"):
        model.generate(**inputs, adapter_names=["alpha"], max_new_tokens=4, do_sample=False)
    with pytest.raises(LorakitError, match="adapter_names has 3 names for 2 prompts"):
        model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       adapter_names=["alpha", "beta", "__base__"], max_new_tokens=4, do_sample=False)
    names = ["beta", "__base__"]
    out = model.generate(**inputs, adapter_names=names, max_new_tokens=6, do_sample=False, num_beams=2,
                         num_return_sequences=2)
    width = inputs["input_ids"].shape[1]
    for row, (prompt, name) in enumerate(zip(prompts, names)):
        alone = tokenizer([prompt], return_tensors="pt")
        lorakit.set_adapter(model, "beta")
        with lorakit.disable_adapters(model) if name == "__base__" else torch.no_grad():
            expected = model.generate(**alone, max_new_tokens=6, do_sample=False, num_beams=2, num_return_sequences=2)
        for k in range(2):
            assert out[2 * row + k, width:].tolist() == expected[k, alone["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("flags", [[], ["--no-chat"], ["--system", "Be brief."]])
def test_cli_greedy_answers_equal_transformers_generate_on_the_merged_weights(hf, capsys, flags):
    """Token for token (the text of the ids transformers' generate gives the merged model, up to its first
    end-of-turn), for the chat template, a raw completion and a system turn; each row of a side-by-side run
    equals that adapter's run alone."""
    from lorakit.generation import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(hf["model"])
    prompt = "The capital of France is"
    if "--no-chat" in flags:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:
        messages = ([{"role": "system", "content": flags[1]}] if "--system" in flags else []) + \
            [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    texts = []
    for adapter in hf["adapters"]:
        merged = _merged(hf, adapter)
        stops = end_of_turn_ids(tokenizer, merged)
        new = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=list(stops))[0, ids.shape[1]:].tolist()
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
        assert main(["generate", "--model", str(hf["model"]), "--adapter", str(adapter), "--max-new-tokens", "12",
                     *flags, prompt]) == 0
        assert capsys.readouterr().out == texts[-1] + "\n"
    assert texts[0] != texts[1]  # the adapters differ (else the comparison proves little)
    assert main(["generate", "--model", str(hf["model"]), *[a for ad in hf["adapters"] for a in ("--adapter", str(ad))],
                 "--max-new-tokens", "12", *flags, prompt]) == 0
    out = capsys.readouterr().out
    for adapter, text in zip(hf["adapters"], texts):
        assert f"=== {adapter.name} (" in out and "\n" + text.strip() + "\n" in out


def test_sampling_with_a_seed_repeats_and_rows_sample_as_alone(hf, capsys):
    """The same seed gives the same text; a row of a side-by-side run samples what it samples alone."""
    model, adapter = str(hf["model"]), str(hf["adapters"][0])
    common = ["--temperature", "1.5", "--top-p", "0.9", "--top-k", "100000", "--seed", "7", "--max-new-tokens", "10"]
    answers = []
    for extra in ([], [], ["--adapter", adapter], ["--adapter", adapter, "--base"]):
        assert main(["generate", "--model", model, *extra, *common, "Hello there"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]
    assert answers[3].split("=== ")[1].split("\n", 1)[1] == answers[0].strip() + "\n"
    assert answers[3].split("=== ")[2].split("\n", 1)[1] == answers[2].strip() + "\n"


def test_eval_loss_and_perplexity_are_the_hand_computed_mean_cross_entropy(hf, tmp_path):
    """Prompt/completion records: the completion's tokens and the closing end-of-text are the targets; the loss is
    their mean cross-entropy under the model (here with the adapter merged), perplexity its exp."""
    import math

    data = tmp_path / "qa.jsonl"
    records = [{"prompt": "Hello there", "completion": " The capital"}, {"prompt": "What is LoRA?", "completion": " a"},
               {"prompt": "Say hi", "completion": " hi"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(hf["model"])
    merged = _merged(hf, hf["adapters"][0])
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            prompt = tokenizer(record["prompt"])["input_ids"]
            target = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + target])
            logits = merged(ids).logits[0, len(prompt) - 1: -1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
            count += len(target)
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(hf["model"]), "--adapter", str(hf["adapters"][0]), "--data", str(data),
                 "--no-progress", "--json", str(out), "--batch-size", "2"]) == 0
    results = json.loads(out.read_text())
    assert results["supervised_tokens"] == count and results["examples"] == 3
    assert results["loss"] == pytest.approx(total / count, rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert results["exact_match"] == 0.0 and results["scored_examples"] == 3


def test_eval_answers_do_not_depend_on_the_batch_size(hf, tmp_path, capsys):
    """A batch ran to the context its longest prompt left, and to its largest token limit: a short record batched
    with a prompt near the context had its answer cut there (eval's predictions, hence exact match, changed with
    --batch-size), a prompt longer than the context emptied every answer of its batch, and a record with a small
    limit ran on to its neighbour's. Every answer is now the one its record gets alone."""
    from lorakit.train.evaluate import generate_records
    from lorakit.train.sources import read_many

    tokenizer = AutoTokenizer.from_pretrained(hf["model"])  # the model's context: 256 tokens
    words = 1
    while len(tokenizer("Hello " * words)["input_ids"]) < 248:
        words += 1
    data = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "Hello " * words, "completion": " hi"}, {"prompt": "Say", "completion": " hi"},
            {"prompt": "What is LoRA?", "completion": " a"}, {"prompt": "Hello " * 300, "completion": " hi"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    records = read_many([str(data)])
    model, _ = lorakit.load_base(str(hf["model"]))
    limits = [30, 30, 3, 30]
    alone = [generate_records(model, tokenizer, [record], max_new_tokens=[limit])[0]
             for record, limit in zip(records, limits)]
    assert len(tokenizer(alone[1].text, add_special_tokens=False)["input_ids"]) > 8  # more than 256 - 248 steps
    assert alone[3].text == ""  # no room at all
    for batch_size in (2, 4, 16):
        assert generate_records(model, tokenizer, records, max_new_tokens=limits, batch_size=batch_size) == alone
    # the command: the same printed answers at --batch-size 1 and 16 (the over-long record is dropped there)
    printed = []
    for batch_size in ("1", "16"):
        out = tmp_path / f"b{batch_size}.json"
        assert main(["eval", "--model", str(hf["model"]), "--data", str(data), "--no-progress", "--json", str(out),
                     "--batch-size", batch_size, "--samples", "3", "--max-new-tokens", "30"]) == 0
        assert json.loads(out.read_text())["examples"] == 3
        printed.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("  [")])
    assert len(printed[0]) == 3 and printed[0] == printed[1]


def test_eval_exact_match_counts_the_answers_transformers_generates(tmp_path):
    """Exact match by hand: records whose reference is the greedy answer transformers' generate gives (ending at the
    end-of-turn token) count, one with another answer does not: 2/3 (word-level tokenizer: clean texts)."""
    import itertools

    from conftest import tiny_llama
    from test_train_helpers import LETTERS, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=3, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                       initializer_range=0.6, bos_token_id=1, eos_token_id=3, pad_token_id=3)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    found = []
    for a, b in itertools.product(LETTERS, LETTERS):
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": f"copy : {a} {b}"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        new = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=3,
                             pad_token_id=3)[0, inputs["input_ids"].shape[1]:].tolist()
        if 3 in new[1:5]:  # an answer of 1-4 words, then the end of the turn
            found.append((f"copy : {a} {b}", tokenizer.decode(new[:new.index(3)], skip_special_tokens=True)))
        if len(found) == 2:
            break
    assert len(found) == 2
    chats = [[p, answer] for p, answer in found] + [["copy : a b", "q q q"]]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant",
                                                                                      "content": answer}]}) + "\n"
                            for p, answer in chats), encoding="utf-8")
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--no-progress", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["exact_match"] == pytest.approx(2 / 3) and results["scored_examples"] == 3
