"""The data files a new user brings to ``lorakit train --data`` / ``--val-data``, as other tools write them.

Each record format trains with the right targets (checked on the labels: only the answer and its end-of-turn
token are supervised), each file layout is read, and each hostile file stops before training with one line that
names the file, the line or record and the fix. The tokenizer is the small ChatML BPE of the serving tests (a
real byte-level BPE with offsets), so label checks decode to exact text.
"""

from __future__ import annotations

import gzip
import json
import re
import time
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train.data import IGNORE_INDEX, build_dataset, build_datasets, tokenize_example
from lorakit.train.formats import VALIDATION_SPLITS, read_many, read_records, validate_record
from test_cli_newuser import TOOL_TEMPLATE
from test_serve_support import make_tokenizer
from test_train_helpers import task_records, tiny_folder, write_jsonl  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _targets(example, tokenizer) -> str:
    """The supervised text of a tokenized example."""
    return tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX])


def _write(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, records)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


# -- record formats -------------------------------------------------------------------------------------------------
USER_ASSISTANT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
RECORDS = [
    # OpenAI chat: content as a list of text parts, a name, API noise keys (refusal null, annotations [])
    ("openai parts", {"messages": [
        {"role": "user", "name": "bob", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}], "refusal": None, "annotations": []}]},
     USER_ASSISTANT, "4<|im_end|>"),
    # a multi-turn chat that ends with an unanswered user turn: trimmed, both answers trained
    ("trailing user turn", {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"}, {"role": "user", "content": "Thanks!"}]},
     "<|im_start|>system\nBe brief.<|im_end|>\n" + USER_ASSISTANT
     + "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n", "4<|im_end|>6<|im_end|>"),
    ("sharegpt", {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"},
                                    {"from": "gpt", "value": "4"}]},
     "<|im_start|>system\nBe brief.<|im_end|>\n" + USER_ASSISTANT, "4<|im_end|>"),
    ("sharegpt capitalised", {"Conversations": [{"From": "Human", "Value": "What is 2+2?"}, {"From": "GPT", "Value": "4"}]},
     USER_ASSISTANT, "4<|im_end|>"),
    # the two key sets swapped, as many Hub datasets have them
    ("conversations of role/content", {"conversations": [{"role": "user", "content": "What is 2+2?"},
                                                         {"role": "assistant", "content": "4"}]}, USER_ASSISTANT, "4<|im_end|>"),
    ("messages of from/value", {"messages": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
     USER_ASSISTANT, "4<|im_end|>"),
    ("gemini", {"systemInstruction": {"parts": [{"text": "Be brief."}]},
                "contents": [{"role": "user", "parts": [{"text": "What is 2+2?"}]}, {"role": "model", "parts": [{"text": "4"}]}]},
     "<|im_start|>system\nBe brief.<|im_end|>\n" + USER_ASSISTANT, "4<|im_end|>"),
    ("cohere chatbot role", {"messages": [{"role": "User", "content": "What is 2+2?"}, {"role": "Chatbot", "content": "4"}]},
     USER_ASSISTANT, "4<|im_end|>"),
    ("alpaca empty input", {"instruction": "What is 2+2?", "input": "", "output": "4"}, USER_ASSISTANT, "4<|im_end|>"),
    ("alpaca null input", {"instruction": "What is 2+2?", "input": None, "output": "4"}, USER_ASSISTANT, "4<|im_end|>"),
    ("dolly", {"instruction": "What is", "context": "2+2?", "response": "4", "category": "open_qa"},
     "<|im_start|>user\nWhat is\n\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n", "4<|im_end|>"),
    ("question/answer", {"question": "What is 2+2?", "answer": "4"}, USER_ASSISTANT, "4<|im_end|>"),
    ("question/context/answer", {"context": "Numbers:", "question": "What is 2+2?", "answer": "4"},
     "<|im_start|>user\nNumbers:\n\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n", "4<|im_end|>"),
    # OpenAI's newer names: the developer role, the Responses API's input_text / output_text parts
    ("developer role", {"messages": [
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "input_text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "4"}]}]},
     "<|im_start|>system\nBe brief.<|im_end|>\n" + USER_ASSISTANT, "4<|im_end|>"),
    # a tool result given as a JSON object (glaive / xlam exports) is written as JSON text
    ("tool result object", {"messages": [
        {"role": "user", "content": "What is 2+2?"}, {"role": "tool", "content": {"sum": 4}},
        {"role": "assistant", "content": "4"}]},
     '<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>tool\n{"sum": 4}<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n',
     "4<|im_end|>"),
    # the space before "4" merges into its token, which is then a target (as it is at inference)
    ("prompt/completion", {"prompt": "What is 2+2? ", "completion": "4"}, "What is 2+2? 4<|im_end|>", " 4<|im_end|>"),
    ("capitalised keys", {"Prompt": "What is 2+2?", " Completion ": " 4"}, "What is 2+2? 4<|im_end|>", " 4<|im_end|>"),
    ("capitalised chat", {"Messages": [{"Role": "User", "Content": "What is 2+2?"}, {"Role": "Assistant", "Content": "4"}]},
     USER_ASSISTANT, "4<|im_end|>"),
    ("text", {"text": "Paris is the capital of France."}, "Paris is the capital of France.<|im_end|>",
     None),  # every token but the first (position 0 predicts nothing)
]


@pytest.mark.parametrize("case,record,text,targets", RECORDS, ids=[c[0] for c in RECORDS])
def test_record_formats_train_the_answer_only(case, record, text, targets, tok):
    example = tokenize_example(record, tok, 256)
    assert tok.decode(example["input_ids"]) == text
    assert _targets(example, tok) == (targets or tok.decode(example["input_ids"][1:]))


def test_without_a_chat_template_pairs_train_in_a_prompt_format():
    """A base tokenizer without a template: question/answer and Dolly records take a plain prompt form instead."""
    plain = make_tokenizer()
    plain.chat_template = None
    qa = tokenize_example({"question": "What is 2+2?", "answer": "4"}, plain, 128)
    assert plain.decode(qa["input_ids"]) == "Question: What is 2+2?\nAnswer: 4<|im_end|>"
    assert _targets(qa, plain) in ("4<|im_end|>", " 4<|im_end|>")
    dolly = tokenize_example({"instruction": "Add.", "context": "2 2", "response": "4"}, plain, 128)
    assert plain.decode(dolly["input_ids"]) == "### Instruction:\nAdd.\n\n### Input:\n2 2\n\n### Response:\n4<|im_end|>"
    assert _targets(dolly, plain) == "4<|im_end|>"


def test_trimmed_chats_are_counted_in_the_summary(tok):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "bye"}]}
    record = validate_record(chat, "chats.jsonl:3")
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"] and record.fields["trimmed_turns"] == 1
    ds = build_dataset([chat, {"prompt": "a ", "completion": "b"}], tok, 64)
    assert ds.summary.trimmed_chats == 1 and ds.summary.examples == 2
    assert "note: 1 chat ends with turns after the last assistant reply, which were trimmed" in ds.summary.drop_note()
    with pytest.raises(LorakitError, match=r"x:1: the chat does not end with an assistant turn \(it has none, only "
                                           r"system, user\)") as info:
        validate_record({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}, "x:1")
    _one_line(info)


def test_openai_legacy_function_calling_reads_as_tools(tok):
    """functions / function_call / role "function" (OpenAI before tools) train like tools / tool_calls / tool."""
    legacy = {"functions": [{"name": "get_weather", "parameters": {"type": "object"}}], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    record = validate_record(legacy, "fn.jsonl:1")
    assert record["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert record["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert record["messages"][2] == {"role": "tool", "content": "sunny", "name": "get_weather"}
    tools_tok = make_tokenizer()
    tools_tok.chat_template = TOOL_TEMPLATE
    example = tokenize_example(legacy, tools_tok, 512)
    assert _targets(example, tools_tok) == ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                            '</tool_call><|im_end|>Sunny.<|im_end|>')
    with pytest.raises(LorakitError, match=r"fn\.jsonl:1: messages\[1\] calls tool 'get_weather', but this model's "
                                           "chat template does not write tool calls"):
        tokenize_example(record, tok, 512)  # plain ChatML drops the call: refused, not trained without it
    both = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                         "function_call": {"name": "f"}, "tool_calls": [{"function": {"name": "f"}}]}]}
    with pytest.raises(LorakitError, match=r"messages\[1\] has both 'function_call' and 'tool_calls'; keep one"):
        validate_record(both, "x:1")


THINK_TEMPLATE = (  # Qwen3's handling of reasoning_content, reduced
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.reasoning_content %}<think>\n"
    "{{ m.reasoning_content.strip() }}\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_reasoning_content_is_trained_where_the_template_writes_it(tok):
    """Distilled-reasoning chats: the reasoning is part of the target with a template that writes it, and refused
    (not silently dropped) with one that does not."""
    record = {"messages": [{"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "4"}]}
    think_tok = make_tokenizer()
    think_tok.chat_template = THINK_TEMPLATE
    example = tokenize_example(record, think_tok, 256)
    assert _targets(example, think_tok) == "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"
    with pytest.raises(LorakitError) as info:
        tokenize_example(validate_record(record, "r1.jsonl:7"), tok, 256)
    assert _one_line(info).startswith("r1.jsonl:7: messages[1] has 'reasoning_content', but this model's chat template "
                                      "does not write it; put the reasoning into the content")
    with pytest.raises(LorakitError, match=r"messages\[0\] \(user\) has 'thinking'; give one, on an assistant turn"):
        validate_record({"messages": [{"role": "user", "content": "q", "thinking": "x"},
                                      {"role": "assistant", "content": "a"}]}, "x:1")


@pytest.mark.parametrize("record", [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]},
    {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},  # Anthropic HH
], ids=["dpo", "dpo chat", "hh"])
def test_preference_records_are_refused_with_the_way_to_sft(record):
    """lorakit does supervised fine-tuning: a DPO file is refused (not silently trained on 'chosen'), saying how."""
    with pytest.raises(LorakitError, match=r"prefs\.jsonl:4: a preference \(DPO\) record .*rename 'chosen' to "
                                           r"'completion'.* and delete 'rejected'") as info:
        validate_record(record, "prefs.jsonl:4")
    _one_line(info)


def test_all_unknown_fields_are_named_at_once():
    """An export with several extra columns (LMSYS-Chat: model, turn, ...) is fixed in one go, not one run per field."""
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(LorakitError) as info:
        validate_record({"messages": chat, "model": "gpt-4", "turn": 1, "redacted": False}, "chats.jsonl:9")
    assert _one_line(info) == ("chats.jsonl:9: unknown fields 'model', 'turn', 'redacted'; a messages record has only "
                               "'messages': remove them")


@pytest.mark.parametrize("record,hint", [
    ({"query": "q", "response": "r"}, "rename 'query' to 'prompt' and 'response' to 'completion'"),
    ({"input": "q", "output": "r"}, "rename 'input' to 'prompt' and 'output' to 'completion'"),
    ({"conversation": [{"role": "user", "content": "q"}]}, "if 'conversation' is the chat, rename it to 'messages'"),
    ({"dialog": [{"from": "human", "value": "q"}]}, "if 'dialog' is the chat, rename it to 'conversations'"),
])
def test_unknown_layouts_say_what_to_rename(record, hint):
    with pytest.raises(LorakitError, match=r"x\.jsonl:2: no known field") as info:
        validate_record(record, "x.jsonl:2")
    assert _one_line(info).endswith(hint)


# -- file layouts ---------------------------------------------------------------------------------------------------
def test_file_layouts_other_tools_write(tmp_path):
    pc = [{"prompt": "q1 ", "completion": "a1"}, {"prompt": "q2 ", "completion": "a2"}]
    expected = [dict(r) for r in pc]

    def fields(path, **kw):
        return [dict(r.fields) for r in read_records(path, **kw)]

    (tmp_path / "array.json").write_text(json.dumps(pc, indent=2))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": "1.0", "data": pc}))
    (tmp_path / "wrapped.jsonl").write_text(json.dumps({"examples": pc}) + "\n")
    (tmp_path / "pretty.jsonl").write_text("".join(json.dumps(r, indent=2) + "\n" for r in pc))  # `jq .` output
    (tmp_path / "gz.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in pc).encode()))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in pc).encode())
    (tmp_path / "caps.csv").write_text("Prompt, Completion\nq1 ,a1\nq2 ,a2\n")
    (tmp_path / "t.tsv").write_text("prompt\tcompletion\nq1 \ta1\nq2 \ta2\n")
    (tmp_path / "pandas.csv").write_text(",prompt,completion\n5,q1 ,a1\n7,q2 ,a2\n")  # df.to_csv() keeps the index
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfprompt;completion\r\nq1 ;a1\r\nq2 ;a2\r\n")  # European Excel
    for name in ("array.json", "wrapped.json", "wrapped.jsonl", "pretty.jsonl", "gz.jsonl.gz", "bom.jsonl", "caps.csv",
                 "t.tsv", "excel.csv", "pandas.csv"):
        assert fields(tmp_path / name) == expected, name
    assert read_records(tmp_path / "wrapped.json")[1].where == "wrapped.json[data][1]"
    (tmp_path / "splits.json").write_text(json.dumps({"train": pc[:1], "test": pc[1:]}))  # one file, split by key
    assert fields(tmp_path / "splits.json") == expected[:1]
    assert fields(tmp_path / "splits.json", split=VALIDATION_SPLITS) == expected[1:]
    assert [r.where for r in read_records(tmp_path / "pretty.jsonl")] == ["pretty.jsonl:1", "pretty.jsonl:5"]

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(pc), tmp_path / "p.parquet")
    assert fields(tmp_path / "p.parquet") == expected
    indexed = [{**r, "__index_level_0__": i + 5} for i, r in enumerate(pc)]  # df.to_parquet() with an index
    pq.write_table(pa.Table.from_pylist(indexed), tmp_path / "indexed.parquet")
    assert fields(tmp_path / "indexed.parquet") == expected
    datasets.Dataset.from_list(pc).save_to_disk(str(tmp_path / "ds"))
    assert fields(tmp_path / "ds") == expected
    splits = {"train": pc[:1], "test": pc[1:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(tmp_path / "dd"))
    assert fields(tmp_path / "dd") == expected[:1]  # --data: the train split
    assert fields(tmp_path / "dd", split=VALIDATION_SPLITS) == expected[1:]  # --val-data: validation, else test
    assert fields(tmp_path / "dd" / "test") == expected[1:]  # a split's own folder

    # a folder of shards, and a folder laid out by split (train/validation/test files): --data never reads test
    for i, r in enumerate(pc):
        _write(tmp_path / "shards" / f"part-{i}.jsonl", [r])
    (tmp_path / "shards" / "README.md").write_text("notes")
    assert fields(tmp_path / "shards") == expected
    assert fields(str(tmp_path / "shards" / "*")) == expected  # a glob skips the README
    for name, r in (("train.jsonl", pc[0]), ("validation.jsonl", pc[1]), ("test.jsonl", {"text": "t"})):
        _write(tmp_path / "hf" / name, [r])
    assert fields(tmp_path / "hf") == expected[:1]
    assert fields(tmp_path / "hf", split=VALIDATION_SPLITS) == expected[1:]
    _write(tmp_path / "nested" / "train" / "part-0.jsonl", pc[:1])  # one subfolder per split
    _write(tmp_path / "nested" / "test" / "part-0.jsonl", pc[1:])
    assert fields(tmp_path / "nested") == expected[:1]
    assert fields(tmp_path / "nested", split=VALIDATION_SPLITS) == expected[1:]


def test_a_chat_column_pandas_wrote_as_python_repr(tmp_path):
    """df.to_csv() writes a column of lists as Python repr (single quotes), not JSON: read as the chat it is."""
    import csv

    chat = [{"role": "user", "content": "it's 2+2?"}, {"role": "assistant", "content": "4"}]
    with open(tmp_path / "chats.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["messages"], [repr(chat)]])
    assert read_records(tmp_path / "chats.csv")[0]["messages"] == chat
    with open(tmp_path / "bad.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["messages"], ["[{'role': 'user', 'content': open('x')}]"]])  # not a literal
    with pytest.raises(LorakitError, match=r"bad\.csv:2: field 'messages' is a string that is not JSON"):
        read_records(tmp_path / "bad.csv")


def test_a_chat_given_as_its_bare_list_of_turns(tmp_path):
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (tmp_path / "lines.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
    (tmp_path / "array.json").write_text(json.dumps([chat, [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]]))
    for name, wheres in (("lines.jsonl", ["lines.jsonl:1", "lines.jsonl:2"]), ("array.json", ["array.json[0]", "array.json[1]"])):
        records = read_records(tmp_path / name)
        assert [r.where for r in records] == wheres and all(r["messages"] == chat for r in records)


def test_mixed_shapes_in_one_file_each_masked_as_its_shape(tmp_path, tok):
    rows = [{"text": "The quick brown fox."}, {"prompt": "What is 2+2?", "completion": " 4"},
            {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
            {"question": "What is 2+2?", "answer": "4"}]
    ds = build_dataset(read_records(write_jsonl(tmp_path / "mixed.jsonl", rows)), tok, 128)
    assert ds.summary.shapes == {"text": 1, "prompt_completion": 1, "messages": 2}
    assert [_targets(row, tok) for row in ds] == [tok.decode(ds[0]["input_ids"][1:]), " 4<|im_end|>", "4<|im_end|>",
                                                  "4<|im_end|>"]
    assert tok.decode(ds[0]["input_ids"]) == "The quick brown fox.<|im_end|>"


# -- hostile files --------------------------------------------------------------------------------------------------
GOOD = b'{"prompt": "q ", "completion": "a"}\n'
HOSTILE = [
    ("empty.jsonl", b"", r"empty\.jsonl: no records in it"),
    ("blank.jsonl", b"\n  \n\r\n", r"blank\.jsonl: no records in it"),
    ("latin1.jsonl", GOOD + '{"text": "café"}\n'.encode("latin-1"),
     r"latin1\.jsonl:2: not valid UTF-8 \(byte 14\); it looks like Latin-1 .*iconv -f cp1252 -t utf-8"),
    ("latin1.csv", "text\nok\ncafé\n".encode("latin-1"), r"latin1\.csv:3: not valid UTF-8 .*iconv"),
    ("list.jsonl", GOOD + b"[1, 2]\n", r"list\.jsonl:2: expected an object"),
    ("null_line.jsonl", GOOD + b"null\n", r"null_line\.jsonl:2: expected an object .* got null"),
    ("commas.jsonl", GOOD.strip() + b",\n" + GOOD, r"commas\.jsonl:1: malformed JSON .*a comma after the object"),
    ("string.jsonl", GOOD + b'"just text"\n', r"string\.jsonl:2: expected an object .* got a string"),
    ("broken.jsonl", GOOD + b'{"text": "a"\n' + GOOD, r"broken\.jsonl:2: malformed JSON"),
    ("null.jsonl", GOOD + b'{"prompt": "q", "completion": null}\n', r"null\.jsonl:2: field 'completion' is null"),
    ("number.jsonl", GOOD + b'{"prompt": "2+2=", "completion": 4}\n',
     r"number\.jsonl:2: field 'completion' must be a string, got int 4; write it as a JSON string \(\"4\"\)"),
    ("nan.jsonl", b'{"prompt": "q", "completion": NaN}\n', r"nan\.jsonl:1: .* got NaN \(an empty cell"),
    ("number_content.jsonl", b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 4}]}\n',
     r"number_content\.jsonl:1: messages\[1\] \(assistant\) content must be a string, got int 4"),
    ("user_only.jsonl", b'{"messages": [{"role": "user", "content": "q"}]}\n',
     r"user_only\.jsonl:1: the chat does not end with an assistant turn"),
    ("dpo.jsonl", b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n', r"dpo\.jsonl:1: a preference \(DPO\) record"),
    ("gemini_call.jsonl", b'{"contents": [{"role": "user", "parts": [{"text": "q"}]}, {"role": "model", "parts": '
                          b'[{"functionCall": {"name": "f"}}]}]}\n',
     r"gemini_call\.jsonl:1: contents\[1\]\.parts\[0\] is a 'functionCall' part; lorakit reads the text parts"),
    ("notes.txt", b"hello\n", r"notes\.txt: unsupported data file type '\.txt'.*write each document as \{\"text\""),
    ("sheet.xlsx", b"PK\x03\x04", r"sheet\.xlsx: unsupported data file type '\.xlsx'.*export the sheet as CSV"),
    ("binary.jsonl", bytes(range(256)), r"binary\.jsonl: binary data \(NUL bytes\), not a JSONL/CSV text file"),
    ("parquet.jsonl", b"", r"parquet\.jsonl: a Parquet file with a text file's name; rename it to \.parquet"),
    ("u16.jsonl", '{"text": "a"}\n'.encode("utf-16-le"), r"u16\.jsonl: UTF-16 text without a byte-order mark"),
]


@pytest.mark.parametrize("name,content,message", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_files_stop_with_one_line(name, content, message, tmp_path):
    (tmp_path / name).write_bytes(content)
    if name == "parquet.jsonl":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{"text": "a"}]), tmp_path / name)
    with pytest.raises(LorakitError) as info:
        read_many([tmp_path / name])
    assert re.search(message, _one_line(info)), str(info.value)


def test_hostile_paths_stop_with_one_line(tmp_path):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("x")
    _write(tmp_path / "halfsplit" / "train.jsonl", [{"text": "a"}])
    _write(tmp_path / "halfsplit" / "more.jsonl", [{"text": "b"}])
    _write(tmp_path / "testonly" / "test.jsonl", [{"text": "b"}])
    _write(tmp_path / "snapshot" / "data" / "train.jsonl", [{"text": "b"}])  # a downloaded HF dataset repo
    (tmp_path / "snapshot" / "README.md").write_text("card")
    import datasets

    datasets.DatasetDict({"validation": datasets.Dataset.from_list([{"text": "a"}]),
                          "test": datasets.Dataset.from_list([{"text": "b"}])}).save_to_disk(str(tmp_path / "dd"))
    for path, message in (
        (tmp_path / "missing.jsonl", r"data file not found: .*missing\.jsonl"),
        (tmp_path / "nothing", r"nothing is a folder with no data files .*; give the data files themselves"),
        (tmp_path / "snapshot", r"snapshot is a folder with no data files .*it has the subfolder\(s\) data: give the one"),
        (str(tmp_path / "nothing" / "*"), r"matches 1 files but no data file .*notes\.txt"),
        (tmp_path / "halfsplit", r"halfsplit: some files are named for a split \(train\.jsonl\) and some not \(more\.jsonl\)"),
        (tmp_path / "testonly", r"testonly: its files are named for the splits \['test'\] .*none of them train"),
        (tmp_path / "dd", r"dd: has splits \['validation', 'test'\], none of them train; give the split's own folder"),
    ):
        with pytest.raises(LorakitError) as info:
            read_many([path])
        assert re.search(message, _one_line(info)), str(info.value)


def test_examples_longer_than_max_length_name_the_file(tmp_path, tok):
    long = {"prompt": "The quick brown fox jumps over the lazy dog. " * 4, "completion": "Hello, how are you today?"}
    records = read_records(write_jsonl(tmp_path / "long.jsonl", [long] * 3))
    with pytest.raises(LorakitError) as info:
        build_datasets(records, tok, max_length=16)
    assert re.search(r"training data: no examples left: all 3 \(long\.jsonl:1, \.\.\.\) are longer than max_length=16 "
                     r"tokens \(the shortest has \d+\); raise max_length", _one_line(info))
    # most (not all) dropped: trains, and the note says how many, why and where
    records = read_records(write_jsonl(tmp_path / "most.jsonl", [{"prompt": "q ", "completion": "a"}, long, long]))
    ds = build_dataset(records, tok, max_length=16)
    assert str(ds.summary).startswith("1 example (from 3 records: 3 prompt_completion), 2 dropped")
    assert re.fullmatch(r"note: 2 of 3 examples were dropped: 2 longer than max_length=16 tokens \(raise --max-length "
                        r"or pass --overflow truncate\); the first is most\.jsonl:2", ds.summary.drop_note())


def test_a_5mb_single_line_is_dropped_and_counted_quickly(tmp_path):
    from test_train_helpers import tiny_tokenizer

    big = {"text": "reverse " * 650_000}  # 5.2 MB on one line (650 k words for the word-level tokenizer)
    path = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "copy a : ", "completion": "a"}, big])
    assert path.stat().st_size > 5_000_000
    start = time.perf_counter()
    ds = build_dataset(read_records(path), tiny_tokenizer(), max_length=64)
    assert (ds.summary.examples, ds.summary.dropped, ds.summary.first_dropped) == (1, 1, "big.jsonl:2")
    assert time.perf_counter() - start < 30


# -- through the command line ---------------------------------------------------------------------------------------
def test_cli_reads_a_split_folder_for_data_and_val_data(tmp_path, tiny_folder, capsys):  # noqa: F811
    """--data folder/ trains on train.jsonl only; --val-data folder/ scores validation.jsonl; a chat that ends with
    a user turn trains (trimmed) and the note says so."""
    folder = tmp_path / "data"
    chats = task_records(6, seed=3, shape="messages")
    for chat in chats[:2]:
        chat["messages"].append({"role": "user", "content": "copy a :"})
    _write(folder / "train.jsonl", task_records(10, seed=1) + chats)
    _write(folder / "validation.jsonl", task_records(3, seed=2))
    _write(folder / "test.jsonl", task_records(5, seed=4))
    code = main(["train", "--model", str(tiny_folder), "--data", str(folder), "--val-data", str(folder),
                 "--out", str(tmp_path / "run"), "--max-steps", "1", "--eval-examples", "0", "--rank", "2",
                 "--batch-size", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"training data: 16 examples \(6 messages, 10 prompt_completion\), 0 dropped", out), out
    assert "note: 2 chats end with turns after the last assistant reply, which were trimmed" in out
    assert re.search(r"validation data: 3 examples", out), out


def test_cli_refuses_a_latin1_file_in_one_line(tmp_path, tiny_folder, capsys):  # noqa: F811
    data = tmp_path / "export.jsonl"
    data.write_bytes(b'{"prompt": "copy a : ", "completion": "a"}\n' + '{"text": "a b é"}\n'.encode("latin-1"))
    code = main(["train", "--model", str(tiny_folder), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.fullmatch(r"lorakit train: error: export\.jsonl:2: not valid UTF-8 \(byte 15\); it looks like Latin-1 .*",
                        err.strip().splitlines()[-1])


def test_eval_reads_the_validation_split_of_a_split_folder(tmp_path, tiny_folder, capsys):  # noqa: F811
    """`lorakit eval --data folder/` scores validation.jsonl, not the training split beside it."""
    folder = tmp_path / "data"
    _write(folder / "train.jsonl", task_records(10, seed=1))
    _write(folder / "validation.jsonl", task_records(3, seed=2))
    code = main(["eval", "--model", str(tiny_folder), "--data", str(folder), "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r" on 3 examples \(", out), out
