"""Audit 14: ``lorakit train`` / ``lorakit eval`` and their data loading as a new user with their own files.

Each test is a file (or option) a user brings that an earlier version read wrongly or stopped on unclearly; the checks
are on the records read, the tokens supervised, or the one line the run stops with. Tiny tokenizers (the ChatML
byte-level BPE of the serving tests) and tiny random Llama folders (tests/test_train_helpers.py).
"""

from __future__ import annotations

import json

import pytest

from lorakit.errors import LorakitError
from lorakit.train.sources import read_many
from test_serve_support import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _error(paths) -> str:
    with pytest.raises(LorakitError) as info:
        read_many(paths)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# -- a key given twice in one JSON object ----------------------------------------------------------------------------
def test_a_key_given_twice_in_a_record_is_refused_with_its_line(tmp_path):
    """json keeps the last value of a repeated key without a word: {"completion": "real answer", ..., "completion": ""}
    trained on the second, and a chat's turn with "content" twice lost the first. Every JSON layout names the line:
    JSONL, a pretty-printed array (the line of the record's "{", not of the file's "["), objects one after another,
    a {"data": [...]} wrapper, and a duplicate inside a message."""
    good = {"instruction": "Hi", "input": "", "output": "Hello"}
    (tmp_path / "a.jsonl").write_text(json.dumps(good) + "\n" + '{"prompt": "q", "completion": "real answer", '
                                      '"completion": ""}\n')
    assert _error(tmp_path / "a.jsonl") == ("a.jsonl:2: the key 'completion' is given twice in one object; JSON "
                                            "readers keep only the last one, silently: remove or rename one of them")
    array = json.dumps([good, good], indent=2)[:-2] + ',\n  {\n    "instruction": "a",\n    "output": "b",\n' \
        '    "output": "c"\n  }\n]'
    (tmp_path / "alpaca.json").write_text(array)
    assert array.splitlines()[11] == "  {"
    assert _error(tmp_path / "alpaca.json").startswith("alpaca.json:12: the key 'output' is given twice")
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    pretty = json.dumps(good, indent=2) + "\n" + json.dumps(chat, indent=2).replace('"content": "b"',
                                                                                    '"content": "b", "content": "c"')
    (tmp_path / "jq.jsonl").write_text(pretty + "\n")
    assert pretty.splitlines()[11] == "    {"  # the assistant message's own line
    assert _error(tmp_path / "jq.jsonl").startswith("jq.jsonl:12: the key 'content' is given twice")
    (tmp_path / "wrap.json").write_text('{\n "data": [\n  {"prompt": "a", "completion": "b"},\n'
                                        '  {"prompt": "a",\n   "prompt": "x", "completion": "b"}]}')
    assert _error(tmp_path / "wrap.json").startswith("wrap.json:4: the key 'prompt' is given twice")
    (tmp_path / "turns.jsonl").write_text(json.dumps(chat["messages"]) + "\n" + json.dumps(chat["messages"]).replace(
        '"role": "assistant"', '"role": "assistant", "role": "user"') + "\n")  # bare lists of turns, one per line
    assert _error(tmp_path / "turns.jsonl").startswith("turns.jsonl:2: the key 'role' is given twice")
    # the same files without the repeated key read
    (tmp_path / "fine.json").write_text(json.dumps([good, good], indent=2))
    assert len(read_many(tmp_path / "fine.json")) == 2


# -- a config file setting one option under both spellings ---------------------------------------------------------
@pytest.mark.parametrize("name, text", [
    ("run.yaml", "max-steps: 2\nrank: 4\nmax_steps: 300\n"),
    ("run.json", '{"max-steps": 2, "rank": 4, "max_steps": 300}'),
    ("run.toml", "max-steps = 2\nrank = 4\nmax_steps = 300\n"),
])
def test_a_config_option_given_with_a_dash_and_an_underscore_is_refused(tmp_path, name, text):
    """Options are read with dashes or underscores, and a key given twice is refused, but 'max-steps' and 'max_steps'
    are two keys to the file's reader: the later one won without a word (300 steps where the user read 2)."""
    from lorakit.train.config import read_config_file

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LorakitError) as info:
        read_config_file(path)
    assert str(info.value) == f"{path}: 'max-steps' and 'max_steps' set the same option (max_steps); keep one"
    path.write_text(text.replace("max-steps", "epochs"))
    assert read_config_file(path) == {"epochs": 2.0, "rank": 4, "max_steps": 300}


# -- tool schemas and calls from a table (Parquet, a datasets folder) -----------------------------------------------
def _tool(name: str, parameter: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": "d", "parameters": {
        "type": "object", "properties": {parameter: {"type": "string"}}, "required": [parameter]}}}


def _call_chat(tool: str, parameter: str, value: str) -> dict:
    return {"tools": [_tool(tool, parameter)], "messages": [
        {"role": "user", "content": f"{tool} {value}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": tool, "arguments": {parameter: value}}}]},
        {"role": "tool", "tool_call_id": "call12345", "content": "21"},
        {"role": "assistant", "content": "It is 21."}]}


def test_tool_schemas_and_calls_from_a_table_train_without_other_rows_parameters(tmp_path):
    """A Parquet column holds one struct type, the union of every row's: the get_weather tool of one row came back
    with the "query": null parameter of another row's search tool, and its call's arguments {"city": "Paris"} as
    {"city": "Paris", "query": null}. Both were rendered so: the model learnt schemas and calls nobody wrote. Read
    from a table, each row's tools and calls are what that row holds (as from JSONL)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorakit.train.data import render_examples
    from test_train_tool_calls import family

    rows = [_call_chat("get_weather", "city", "Paris"), _call_chat("search", "query", "news")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "tools.parquet")
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    from_table, from_jsonl = read_many(tmp_path / "tools.parquet"), read_many(tmp_path / "tools.jsonl")
    assert [r["tools"] for r in from_table] == [r["tools"] for r in from_jsonl] == [row["tools"] for row in rows]
    for table, jsonl in zip(from_table, from_jsonl):
        assert table["messages"] == jsonl["messages"]
    tok = family("qwen2.5")  # writes the tool schemas and the calls' arguments as JSON
    for table, jsonl in zip(from_table, from_jsonl):
        rendered = render_examples(table, tok)
        assert rendered == render_examples(jsonl, tok) and "null" not in rendered[0][0], rendered[0][0]


# -- what datasets.load_dataset leaves on disk ----------------------------------------------------------------------
def test_the_cache_load_dataset_writes_and_arrow_files_read(tmp_path):
    """A user who ran datasets.load_dataset has its cache folder (name-train.arrow, name-validation.arrow,
    dataset_info.json, and cache-<fingerprint>.arrow files of .map() calls): it was "a folder with no data files ...
    give the data files themselves", and an .arrow file was refused. Now the folder reads its train split for --data
    and its validation split for --val-data, skipping the .map() results, and an .arrow file (save_to_disk's shards
    too) reads as a table."""
    datasets = pytest.importorskip("datasets")
    from lorakit.train.sources import VALIDATION_SPLITS

    def write(name, n):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"prompt": f"{name[:2]}{i} ", "completion": f"c{i}"}) + "\n"
                                for i in range(n)))
        return str(path)

    loaded = datasets.load_dataset("json", data_files={"train": write("train.jsonl", 5),
                                                       "validation": write("val.jsonl", 2)}, cache_dir=str(tmp_path / "c"))
    loaded["train"].map(lambda row: {"prompt": row["prompt"] + "!"})  # leaves a cache-*.arrow beside the splits
    folder = next((tmp_path / "c").rglob("*-train.arrow")).parent
    assert any(p.name.startswith("cache-") for p in folder.iterdir()) and (folder / "dataset_info.json").is_file()
    train, val = read_many(folder), read_many(folder, VALIDATION_SPLITS)
    assert [r["prompt"] for r in train] == [f"tr{i} " for i in range(5)]
    assert [r["prompt"] for r in val] == [f"va{i} " for i in range(2)]
    assert train[0].where == "json-train.arrow row 0"
    loaded["train"].save_to_disk(str(tmp_path / "saved"))
    shard = next((tmp_path / "saved").glob("*.arrow"))
    assert [r["completion"] for r in read_many(shard)] == [f"c{i}" for i in range(5)]
    (tmp_path / "bad.arrow").write_text("not arrow")
    assert _error(tmp_path / "bad.arrow").startswith(f"{tmp_path / 'bad.arrow'}: not a readable Arrow file (")


def test_a_hub_cache_folder_names_the_snapshot_to_give(tmp_path):
    """~/.cache/huggingface/hub/datasets--org--name (blobs, refs, snapshots) was told "give the one with the data (a
    downloaded Hugging Face dataset keeps its files in data/)", and none of its subfolders holds them: the line now
    names the snapshot's data folder, which reads."""
    import pandas as pd

    repo = tmp_path / "datasets--org--name"
    snapshot = repo / "snapshots" / "abc123"
    (snapshot / "data").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    pd.DataFrame([{"prompt": "p ", "completion": "c"}]).to_parquet(snapshot / "data" / "train-00000-of-00001.parquet")
    assert _error(repo) == (f"{repo} is a Hugging Face hub cache folder (blobs, refs, snapshots); give the data files "
                            f"of its snapshot: {snapshot / 'data'}")
    assert len(read_many(snapshot / "data")) == 1


# -- chats saved from an OpenAI-compatible server's responses --------------------------------------------------------
def test_an_empty_tool_calls_list_is_a_turn_without_calls(tmp_path, tok):
    """vLLM's server answers every message with "tool_calls": [] when there are none (and "reasoning_content": null,
    "refusal": null); chats distilled from it and saved as they came were refused: "messages[1] tool_calls must be
    a non-empty list". They train as the same chat without the key."""
    from lorakit.train.data import build_dataset

    answer = {"role": "assistant", "content": "Paris.", "tool_calls": [], "reasoning_content": None, "refusal": None}
    chat = {"messages": [{"role": "user", "content": "Capital of France?"}, answer]}
    plain = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}
    (tmp_path / "distilled.jsonl").write_text(json.dumps(chat) + "\n")
    (tmp_path / "plain.jsonl").write_text(json.dumps(plain) + "\n")
    assert build_dataset(read_many(tmp_path / "distilled.jsonl"), tok, 64).rows == \
        build_dataset(read_many(tmp_path / "plain.jsonl"), tok, 64).rows
    empty = {"messages": [{"role": "user", "content": "Capital of France?"}, {**answer, "content": ""}]}
    (tmp_path / "empty.jsonl").write_text(json.dumps(empty) + "\n")  # no text and no call: still nothing to learn
    assert _error(tmp_path / "empty.jsonl").startswith("empty.jsonl:1: messages[1]: empty completion")


# -- JSON written by hand or by Python without json.dumps ------------------------------------------------------------
@pytest.mark.parametrize("name, text, message", [
    ("a.jsonl", '{"prompt": "a", "completion": "b",}\n',
     "a.jsonl:1: malformed JSON (Expecting property name enclosed in double quotes at column 35); a comma before the "
     "closing '}': JSON allows none after the last item (Python code does): remove it"),
    ("b.json", '[\n  {"prompt": "a", "completion": "b"},\n]\n',
     "b.json:3: malformed JSON (Expecting value at column 1); a comma before the closing ']'"),
    ("c.json", '[\n  {"prompt": "a",\n   "completion": "b",\n  }\n]',
     "c.json:4: malformed JSON (Expecting property name enclosed in double quotes at column 3); a comma before the "
     "closing '}'"),
    ("d.jsonl", '{"prompt": "a", "completion": "b", "id": None}\n',
     "d.jsonl:1: malformed JSON (Expecting value at column 42); None is Python's, not JSON (null, true, false): write "
     "the records with json.dumps"),
    ("e.json", '[{"prompt": "a", "completion": "b", "weight": True}]', "e.json:1: malformed JSON (Expecting value at "
     "column 47); True is Python's"),
])
def test_a_trailing_comma_or_a_python_literal_says_what_to_change(tmp_path, name, text, message):
    """A comma after the last field or item, and None / True / False, were "Expecting property name enclosed in double
    quotes" with the advice "one object per line" (JSONL), or no advice at all (a JSON array)."""
    (tmp_path / name).write_text(text)
    assert _error(tmp_path / name).startswith(message)


# -- numbers where text is expected, in a table ----------------------------------------------------------------------
def test_a_table_column_of_numbers_says_to_convert_the_column(tmp_path):
    """GSM8K-like tables with an integer answer column were told to "write it as a JSON string ("4")": no advice for
    a Parquet file or a datasets folder, whose column has a number type. The line names the column and the
    conversion; a JSONL file keeps its JSON advice."""
    import pandas as pd

    frame = pd.DataFrame([{"question": "2+2?", "answer": 4}, {"question": "3+3?", "answer": 6}])
    frame.to_parquet(tmp_path / "gsm.parquet")
    assert _error(tmp_path / "gsm.parquet") == ("gsm.parquet row 0: the column 'answer' holds numbers (4), not text; "
                                                "convert it before saving the table, e.g. df['answer'] = "
                                                "df['answer'].astype(str)")
    frame.astype({"answer": str}).to_parquet(tmp_path / "fixed.parquet")
    assert [r["messages"][-1]["content"] for r in read_many(tmp_path / "fixed.parquet")] == ["4", "6"]
    (tmp_path / "gsm.jsonl").write_text('{"question": "2+2?", "answer": 4}\n')
    assert _error(tmp_path / "gsm.jsonl").endswith("must be a string, got int 4; write it as a JSON string (\"4\")")


def test_a_pandas_split_orient_json_file_reads_as_its_rows(tmp_path):
    """DataFrame.to_json(orient="split") keeps the column names apart from the rows: it was "no known field in
    ['columns', 'data']" while the other orients pandas writes read. Its null cells are absent fields, as in any
    table."""
    import pandas as pd

    frame = pd.DataFrame([{"prompt": "a ", "completion": "b", "text": None}, {"prompt": None, "completion": None,
                                                                            "text": "plain"}])
    frame.to_json(tmp_path / "split.json", orient="split")
    records = read_many(tmp_path / "split.json")
    assert [(r.shape, dict(r.fields)) for r in records] == [("prompt_completion", {"prompt": "a ", "completion": "b"}),
                                                            ("text", {"text": "plain"})]
    assert records[1].where == "split.json row 1"


# -- a --data folder that also holds a validation split --------------------------------------------------------------
def test_a_data_folder_with_a_validation_split_says_it_is_not_used(tmp_path, capsys):
    """--data folder/ with train.jsonl and validation.jsonl trains on train.jsonl (right), and the run ended with
    "best validation loss n/a" without a word about the validation file beside it. The run now names it and the flag
    that scores it (with --val-fraction too, which scores a share of the train split instead); no note once --val-data
    is given, or for a test split alone."""
    import datasets

    from lorakit.train.config import TrainConfig
    from lorakit.train.runner import read_data

    rows = [{"prompt": f"p{i} ", "completion": "c"} for i in range(4)]
    folder = tmp_path / "split"
    folder.mkdir()
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "valid": datasets.Dataset.from_list(rows)}
                         ).save_to_disk(str(saved))
    for path, shown in ((folder, "validation.jsonl"), (saved, "valid")):
        train, val = read_data(TrainConfig(data=[str(path)]))
        assert len(train) == 4 and val is None
        assert capsys.readouterr().out.strip().splitlines()[-1] == (
            f"note: --data {path} also holds a validation split ({shown}), which training does not use; to score it "
            f"during training, pass --val-data {path}")
        read_data(TrainConfig(data=[str(path)], val_data=[str(path)]))
        assert "note" not in capsys.readouterr().out
        # --val-fraction holds out part of the train split: right, but the folder's own split went unused unsaid
        read_data(TrainConfig(data=[str(path)], val_fraction=0.25))
        assert capsys.readouterr().out.strip().splitlines()[-1] == (
            f"note: --data {path} also holds a validation split ({shown}); --val-fraction 0.25 holds out part of its "
            f"train split instead. To score on the folder's split, pass --val-data {path} in place of --val-fraction")
    (folder / "validation.jsonl").unlink()
    read_data(TrainConfig(data=[str(folder)]))
    assert "note" not in capsys.readouterr().out


# -- CSV as spreadsheets write it ------------------------------------------------------------------------------------
def test_csv_rows_of_empty_cells_are_blank_lines(tmp_path):
    """A spreadsheet saved as CSV writes ",," for rows below the data that were once formatted or edited (and between
    blocks of data): the first such row stopped the run with "empty completion". They are blank lines, skipped; a
    row with a cell filled and the other empty is still refused."""
    (tmp_path / "sheet.csv").write_text("prompt,completion\r\na,b\r\n,\r\n , \r\nc,d\r\n,\r\n,\r\n")
    assert [dict(r.fields) for r in read_many(tmp_path / "sheet.csv")] == [{"prompt": "a", "completion": "b"},
                                                                          {"prompt": "c", "completion": "d"}]
    (tmp_path / "half.csv").write_text("prompt,completion\na,b\n,\ne,\n")
    assert _error(tmp_path / "half.csv").startswith("half.csv:4: empty completion")


@pytest.mark.parametrize("text", ["sep=;\nprompt;completion\na;b\nc;d\n", "sep=,\r\nprompt,completion\r\na,b\r\nc,d\r\n",
                                  "prompt\tcompletion\na\tb\nc\td\n"])
def test_excel_separator_line_and_tabs_under_a_csv_name(tmp_path, text):
    """Excel's "sep=;" first line (it names the separator for Excel to open the file right) was read as the header,
    and the header line as a record: "no known field in ['sep=']". Tab-separated text saved as .csv was "the header
    line names no known field ('prompt\\tcompletion')". Both read; line numbers count the "sep=" line."""
    (tmp_path / "x.csv").write_text(text)
    assert [dict(r.fields) for r in read_many(tmp_path / "x.csv")] == [{"prompt": "a", "completion": "b"},
                                                                      {"prompt": "c", "completion": "d"}]
    bad = text[:text.rindex("d")] + text[text.rindex("d") + 1:]  # its last row without a completion: line 3 (4)
    (tmp_path / "bad.csv").write_text(bad)
    assert _error(tmp_path / "bad.csv").startswith(f"bad.csv:{4 if text.startswith('sep') else 3}: empty completion")


# -- long chats ------------------------------------------------------------------------------------------------------
def test_target_spans_of_a_long_text_are_found_without_a_scan_per_span(tok):
    """Each target span was found by scanning every token's offsets: a chat of n turns cost n x tokens (0.4 s of a
    60-turn chat's 1.1 s with SmolLM2's tokenizer, paid again on every run and resume). The tokens found are those
    of the scan, on byte-level BPE text with multi-byte characters split over several tokens; 2,000 spans over
    ~40,000 tokens take a fraction of a second (the scan: 80 M comparisons, ~8 s)."""
    import random
    import time

    from lorakit.train.data import _tokenize_with_spans, tokenizer_info
    from test_serve_support import TEXT
    from test_train_helpers import tiny_tokenizer

    def scan(text, spans, tokenizer):  # the old way, as the reference
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for start, end in spans:
            inside = [k for k, (s, e) in enumerate(enc["offset_mapping"]) if e > start and s < end]
            out.append((inside[0], inside[-1] + 1) if inside else (len(enc["input_ids"]), len(enc["input_ids"])))
        return out

    rng = random.Random(0)
    text = " ".join(rng.choice(TEXT) for _ in range(60))  # emoji and CJK characters: several tokens per character
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), 8))
        spans = list(zip(cuts[::2], cuts[1::2])) + [(len(text), len(text))]
        ids, ranges = _tokenize_with_spans(text, spans, tok, tokenizer_info(tok))
        assert ranges == scan(text, spans, tok) and ids == tok(text, add_special_tokens=False)["input_ids"]
    words = tiny_tokenizer()
    long = " ".join(rng.choice("abcdefgh") for _ in range(40_000))
    spans = [(k * 40, k * 40 + 9) for k in range(2_000)]
    started = time.perf_counter()
    ids, ranges = _tokenize_with_spans(long, spans, words, tokenizer_info(words))
    assert time.perf_counter() - started < 2.0  # the scan: ~8 s here
    assert ranges[:3] == [(0, 5), (20, 25), (40, 45)] and len(ids) == 40_000


@pytest.mark.parametrize("name, text, fix", [
    ("nl.jsonl", '{"prompt": "line one\nline two", "completion": "b"}\n', "the string goes on past the end of the "
     "line: a raw line break inside it, which JSON Lines writes as \\n; write the records with json.dumps"),
    ("tab.jsonl", '{"prompt": "a\tb", "completion": "c"}\n', "a raw tab inside a string; JSON writes it as an escape "
     "(\\t, \\n, \\u0001): write the records with json.dumps"),
    ("nl.json", '[{"prompt": "line one\nline two", "completion": "b"}]', "a raw line break inside a string"),
    ("path.jsonl", '{"prompt": "Open C:\\Users\\me", "completion": "c"}\n', "a backslash that starts no JSON escape "
     "(a Windows path?); JSON writes a backslash as \\\\"),
])
def test_raw_control_characters_and_backslashes_in_strings_say_how_json_writes_them(tmp_path, name, text, fix):
    """Records written with string formatting rather than json.dumps: a line break or tab typed into a string, or a
    Windows path's backslashes, stopped with json's words ("Invalid control character at", "Unterminated string")
    and the advice "one object per line" (JSONL) or none (a JSON array)."""
    (tmp_path / name).write_text(text)
    message = _error(tmp_path / name)
    assert message.startswith(f"{name}:1: malformed JSON (") and fix in message, message
    assert "one object per line" not in message


@pytest.mark.parametrize("name, text", [
    ("run.toml", "data = 'train.jsonl'\n[train]\nrank = 4\nlr = 1e-3\n"),
    ("run.yaml", "data: train.jsonl\ntraining:\n  rank: 4\n  lr: 0.001\n"),
])
def test_options_inside_a_section_say_to_move_them_out(tmp_path, name, text):
    """Options put under a section beside top-level ones were "unknown option 'train'; did you mean 'data'?": the
    line says it is a section of options and that options are top-level keys."""
    from lorakit.train.config import read_config_file

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LorakitError) as info:
        read_config_file(path)
    section = "train" if name.endswith("toml") else "training"
    assert str(info.value) == (f"{path}: unknown option {section!r} (a section holding rank, lr); options are top-level "
                               "keys: move them out of it (a file may also be one [train] section and nothing else)")


def test_one_field_given_twice_in_two_cases_is_named_as_such(tmp_path):
    """Field names are read in any case ("Completion" is completion), so a record (or a CSV header) with both
    "completion" and "Completion" has the field twice: it was "unknown field 'Completion' ... remove it", which reads
    as if the name were wrong."""
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "completion": "b", "Completion": "c"}\n')
    assert _error(tmp_path / "a.jsonl") == ("a.jsonl:1: 'Completion' and 'completion' are one field (names are read in "
                                            "any case, spaces trimmed), given twice; keep one")
    (tmp_path / "b.csv").write_text("prompt,completion, Prompt\na,b,c\n")
    assert _error(tmp_path / "b.csv").startswith("b.csv:2: ' Prompt' and 'prompt' are one field")
    (tmp_path / "c.jsonl").write_text('{"prompt": "a", "completion": "b", "label": 3}\n')  # an unknown field as such
    assert _error(tmp_path / "c.jsonl").startswith("c.jsonl:1: unknown field 'label'")


def test_a_gzipped_parquet_file_reads(tmp_path):
    """The readers say "(optionally .gz)" of every data type, and a .jsonl.gz reads, but train.parquet.gz was "not a
    readable Parquet file (... magic bytes not found in footer)": pyarrow read the compressed bytes."""
    import gzip

    import pandas as pd

    pd.DataFrame([{"prompt": "a ", "completion": "b"}]).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress((tmp_path / "t.parquet").read_bytes()))
    assert [dict(r.fields) for r in read_many(tmp_path / "t.parquet.gz")] == [{"prompt": "a ", "completion": "b"}]
    (tmp_path / "bad.parquet.gz").write_bytes(gzip.compress(b"not parquet"))
    assert _error(tmp_path / "bad.parquet.gz").startswith(f"{tmp_path / 'bad.parquet.gz'}: not a readable Parquet file")


def test_a_pattern_skips_the_metadata_files_a_folder_listing_skips(tmp_path):
    """A folder given as --data skips dataset_infos.json / state.json / dataset_info.json, but a pattern over the same
    files ("repo/**/*.json*", "saved/*") read them as records: "dataset_infos.json: no known field in ['default']"."""
    datasets = pytest.importorskip("datasets")

    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "train.jsonl").write_text('{"prompt": "a ", "completion": "b"}\n')
    (tmp_path / "repo" / "dataset_infos.json").write_text('{"default": {"features": {}}}')
    datasets.Dataset.from_list([{"prompt": "c ", "completion": "d"}]).save_to_disk(str(tmp_path / "saved"))
    assert [r["completion"] for r in read_many(str(tmp_path / "repo" / "**" / "*.json*"))] == ["b"]
    assert [r["completion"] for r in read_many(str(tmp_path / "saved" / "*"))] == ["d"]  # its .arrow shard


def test_a_key_given_twice_in_a_chat_held_as_json_text_is_refused(tmp_path):
    """A CSV cell (or a datasets string column) holds a chat as JSON text: a message with "content" twice kept the
    last one silently there too, while the same chat in a JSONL record is refused (b4cb51d)."""
    chat = '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "content": ""}]'
    (tmp_path / "chats.csv").write_text('messages\n"' + chat.replace('"', '""') + '"\n')
    assert _error(tmp_path / "chats.csv") == ("chats.csv:2: field 'messages': the key 'content' is given twice in one "
                                              "object; JSON readers keep only the last one, silently: remove or rename "
                                              "one of them")
    (tmp_path / "fine.csv").write_text('messages\n"' + chat.replace(', "content": ""', "").replace('"', '""') + '"\n')
    assert read_many(tmp_path / "fine.csv")[0]["messages"][-1]["content"] == "Hello"
