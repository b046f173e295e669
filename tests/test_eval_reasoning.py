"""Exact match with reasoning models (lorakit/train/evaluate.py): the final answers are compared, after ``</think>``.

Before: a Qwen3 chat with ``reasoning_content`` scored 0% even when the model answered right (the generation
``<think>\\n...\\n</think>\\n\\n4`` was compared whole with the reference ``4``), and so did DeepSeek-R1/QwQ-style
prompts (the reference repeats the ``<think>\\n`` the prompt opens); the generation limit was the reference answer's
length + 4 tokens, so the reasoning was cut before any answer, without a word. Now both sides are compared after
their last ``</think>``, reasoning answers get room for twice their reasoning, and generations that end inside their
reasoning are counted and named in one note line.

Also here: ``lorakit.train.train()`` given records prints the data summary and the drop note, as ``lorakit train``
does (it printed nothing).

The model's "generation" is scripted (``generate`` monkeypatched to write a given text), so the scoring is tested on
exactly the outputs a reasoning model gives.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.train.config import TrainConfig
from lorakit.train.evaluate import final_answer, score_generations
from lorakit.train.formats import validate_record
from lorakit.train.loop import train
from conftest import tiny_llama
from test_serve_support import make_tokenizer
from test_train_chat_templates import QWEN3_TEMPLATE, R1_TEMPLATE, qwen3_model_folder

QUESTIONS = {"What is 2+2?": ("Two and two make four.", "4"), "And 3+3?": ("Three and three make six.", "6")}


def qwen_record(question: str) -> dict:
    thought, answer = QUESTIONS[question]
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer, "reasoning_content": thought}]}


def r1_record(question: str) -> dict:
    thought, answer = QUESTIONS[question]
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{answer}"}]}


def tokenizer_with(template: str | None):
    tok = make_tokenizer()
    if template is not None:
        tok.chat_template = template
    return tok


def scripted_generate(tok, reply, seen: list | None = None):
    """A ``generate`` that writes ``reply(prompt_text)`` (then the end of turn), cut at ``max_new_tokens`` as the
    real one is; ``seen`` collects the limits it was given."""
    eot = tok.convert_tokens_to_ids("<|im_end|>")

    def generate(input_ids, attention_mask, generation_config, **_):
        if seen is not None:
            seen.append(generation_config.max_new_tokens)
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
            new = tok(reply(prompt), add_special_tokens=False)["input_ids"] + [eot]
            rows.append(ids + new[: generation_config.max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in rows])

    return generate


def question_of(prompt: str) -> str:
    return next(q for q in QUESTIONS if q in prompt)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=len(make_tokenizer()) + 2, max_position_embeddings=256)


def test_final_answer():
    assert final_answer("  Paris \n") == "Paris"  # no reasoning: the whole text, as before
    assert final_answer("<think>\nhmm\n</think>\n\n4") == "4"
    assert final_answer("hmm\n</think>\n\n4", opened=True) == "4"  # the prompt opened <think>
    assert final_answer("<think>\nstill thinking") is None  # cut inside the reasoning: no answer
    assert final_answer("still thinking", opened=True) is None
    assert final_answer("<think>a</think>b</think> 4 ") == "4"  # after the last one


@pytest.mark.parametrize("special", [False, True], ids=["text-tags", "special-tags"])
def test_qwen3_reasoning_content_scores_the_final_answer(model, monkeypatch, special):
    tok = tokenizer_with(QWEN3_TEMPLATE)
    if special:  # tokenizers that make <think> / </think> special tokens: decoding must keep them to find the answer
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
        assert tok.decode(tok("</think>", add_special_tokens=False)["input_ids"], skip_special_tokens=True) == ""
    records = [validate_record(qwen_record(q)) for q in QUESTIONS]
    seen = []

    def reply(prompt):  # right for 2+2, wrong for 3+3
        thought, answer = QUESTIONS[question_of(prompt)]
        return f"<think>\n{thought}\n</think>\n\n{answer if answer == '4' else '7'}"

    monkeypatch.setattr(model, "generate", scripted_generate(tok, reply, seen), raising=False)
    result = score_generations(model, tok, records)
    assert result.matches == [True, False] and result.exact_match == 0.5 and result.correct == 1
    assert result.predictions[0].startswith("<think>\nTwo and two") and result.references == ["4", "6"]
    assert result.unanswered == 0 and result.note() is None
    # room for the reasoning: twice what the model learnt to write (the <think> block and the answer) + 16
    target = "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"
    assert max(seen) >= 2 * len(tok(target, add_special_tokens=False)["input_ids"]) + 16 - 1


def test_r1_prompt_that_opens_think(model, monkeypatch):
    """The prompt ends with ``<think>\\n``: the model writes the reasoning, ``</think>``, then the answer; the
    reference (the content as trained) repeats the ``<think>\\n``. Both final answers are compared."""
    tok = tokenizer_with(R1_TEMPLATE)
    records = [validate_record(r1_record(q)) for q in QUESTIONS]

    def reply(prompt):
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        thought, answer = QUESTIONS[question_of(prompt)]
        return f"{thought}\n</think>\n\n{answer}"

    monkeypatch.setattr(model, "generate", scripted_generate(tok, reply), raising=False)
    result = score_generations(model, tok, records)
    assert result.exact_match == 1.0 and result.references[0].startswith("<think>\n")

    # a generation that does not close the reasoning the prompt opened gives no answer, even if it says "4"
    monkeypatch.setattr(model, "generate", scripted_generate(tok, lambda p: QUESTIONS[question_of(p)][1]), raising=False)
    result = score_generations(model, tok, records)
    assert result.exact_match == 0.0 and result.unanswered == 2 and result.cut == 0
    assert result.note() == ("note: 2 of 2 generations gave no answer after their reasoning and scored as wrong: 2 "
                             "ended inside their reasoning without </think>")


def test_generations_cut_inside_the_reasoning_are_named(model, monkeypatch):
    tok = tokenizer_with(QWEN3_TEMPLATE)
    records = [validate_record(qwen_record(q)) for q in QUESTIONS]
    seen = []
    rambling = "<think>\n" + "and so on " * 60  # never closes within any limit
    monkeypatch.setattr(model, "generate", scripted_generate(tok, lambda p: rambling, seen), raising=False)
    result = score_generations(model, tok, records, max_new_tokens=12)
    assert max(seen) == 12 and result.exact_match == 0.0 and (result.unanswered, result.cut) == (2, 2)
    assert result.note() == ("note: 2 of 2 generations gave no answer after their reasoning and scored as wrong: 2 "
                             "reached the token limit (up to 12 new tokens) inside their <think> reasoning: raise "
                             "--max-new-tokens (max_new_tokens= from Python)")


def test_answers_without_reasoning_keep_the_old_rule(model, monkeypatch):
    """ChatML, no <think>: the whole generation, whitespace-trimmed, against the reference; the limit is the
    reference's length + 4 tokens, at most 64 (or max_new_tokens)."""
    tok = tokenizer_with(None)
    records = [validate_record({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
               for q, (_, a) in QUESTIONS.items()]
    seen = []
    monkeypatch.setattr(model, "generate", scripted_generate(tok, lambda p: " 4 " if "2+2" in p else "6 apples", seen),
                        raising=False)
    result = score_generations(model, tok, records, batch_size=1)
    assert result.matches == [True, False] and result.note() is None
    assert seen == [len(tok("4", add_special_tokens=False)["input_ids"]) + 4] * 2
    records = [validate_record({"prompt": "Q: x\nA:", "completion": " " + "word " * 100})]
    seen.clear()
    score_generations(model, tok, records)
    assert seen == [64]



def right_reply(prompt: str) -> str:
    """The scripted model's reasoning and right answer to the question in ``prompt``."""
    thought, answer = QUESTIONS[question_of(prompt)]
    return f"<think>\n{thought}\n</think>\n\n{answer}"

def test_lorakit_eval_scores_final_answers(tmp_path, monkeypatch, capsys):
    from transformers import LlamaForCausalLM

    folder, tok = qwen3_model_folder(tmp_path / "model")
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(qwen_record(q)) + "\n" for q in QUESTIONS), encoding="utf-8")

    monkeypatch.setattr(LlamaForCausalLM, "generate", lambda self, **kw: scripted_generate(tok, right_reply)(**kw))
    assert main(["eval", "--model", str(folder), "--data", str(data), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "exact match 100.0% (2/2) of the final answers (after </think>)" in out, out
    assert "[ok]" in out and "note:" not in out

    monkeypatch.setattr(LlamaForCausalLM, "generate",
                        lambda self, **kw: scripted_generate(tok, lambda p: "<think>\n" + "more " * 50)(**kw))
    assert main(["eval", "--model", str(folder), "--data", str(data), "--max-new-tokens", "8",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "exact match 0.0% (0/2)" in out and "2 reached the token limit (up to 8 new tokens)" in out, out
    assert json.loads((tmp_path / "r.json").read_text())["unanswered"] == 2


def test_lorakit_train_before_and_after_score_final_answers(tmp_path, monkeypatch, capsys):
    from transformers import LlamaForCausalLM

    folder, tok = qwen3_model_folder(tmp_path / "model")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(qwen_record(q)) + "\n" for q in list(QUESTIONS) * 2), encoding="utf-8")

    monkeypatch.setattr(LlamaForCausalLM, "generate", lambda self, **kw: scripted_generate(tok, right_reply)(**kw))
    code = main(["train", "--model", str(folder), "--data", str(data), "--val-data", str(data), "--out",
                 str(tmp_path / "run"), "--max-steps", "1", "--eval-examples", "2", "--rank", "2", "--batch-size", "2",
                 "--no-progress", "--samples", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "held-out exact match: 100.0% before -> 100.0% after (2 examples)" in out, out
    assert "[ok]" in out


def test_train_from_python_prints_the_data_summary_once(model):
    """``train(model, tok, records)`` tokenizes the records itself: it says what it kept and dropped, as the CLI
    does; a dataset built by the caller (the CLI's) is not reported again."""
    tok = tokenizer_with(None)
    records = [{"prompt": f"Q{i}: what?\nA:", "completion": " yes"} for i in range(4)]
    records.append({"prompt": "long " * 80, "completion": " no"})
    lines = []
    config = TrainConfig(max_steps=1, batch_size=2, rank=2, max_length=32, progress=False, save_every=0)
    result = train(tiny_llama(vocab_size=len(tok)), tok, records, config, log=lines.append)
    assert result.steps == 1
    summary = [line for line in lines if line.startswith("training data: ")]
    assert summary == ["training data: 4 examples (from 5 records: 5 prompt_completion), 1 dropped, 0 truncated at "
                       "max_length=32; " + summary[0].split("; ", 1)[1]], lines
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith("note: 1 of 5 examples were dropped: 1 longer than max_length=32")

    from lorakit.train.data import build_dataset

    lines.clear()
    train(tiny_llama(vocab_size=len(tok)), tok, build_dataset(records, tok, 32), config, log=lines.append)
    assert not any(line.startswith(("training data", "note: ")) for line in lines), lines
