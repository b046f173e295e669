"""Audit 12: training data as a new user brings it to ``lorakit train --data``, exported from popular datasets.

Each case is a row as the public dataset ships it (UltraChat 200k, No Robots, SlimOrca, tatsu-lab's Alpaca, TRL's KTO
sets, a pandas ``to_json``), written to a small file and read through ``read_many`` / ``build_dataset``; the checks
are on the tokens that end up supervised (decoded with the small ChatML byte-level BPE of the serving tests), or on
the one line a file that cannot train stops with.
"""

from __future__ import annotations

import json
import sys

import pytest

from lorakit.errors import LorakitError
from lorakit.train.data import IGNORE_INDEX, Collator, build_dataset
from lorakit.train.formats import validate_record
from lorakit.train.sources import VALIDATION_SPLITS, read_many
from test_serve_support import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def targets(tok, row: dict) -> list[str]:
    """The supervised runs of a dataset row, decoded: one string per run of consecutive target tokens."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE_INDEX:
            assert label == token  # a target is the token at its position (the model shifts by one)
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tok.decode(run) for run in runs + ([current] if current else [])]


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_ultrachat_and_no_robots_rows_train_their_chat(tmp_path, tok):
    """HuggingFaceH4/ultrachat_200k and no_robots carry a "prompt" column beside "messages": the first user turn
    again. It was refused as "unknown field 'prompt'", so neither dataset trained as downloaded."""
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    rows = [{"prompt": "Name a colour.", "prompt_id": "9f3c", "messages": chat},  # UltraChat 200k
            {"prompt": "Name a colour.", "prompt_id": "11aa", "messages": chat, "category": "Chat"}]  # No Robots
    ds = build_dataset(read_many(write_jsonl(tmp_path / "ultrachat.jsonl", rows)), tok, 128)
    assert [targets(tok, row) for row in ds.rows] == [["Blue.<|im_end|>", "Green.<|im_end|>"]] * 2
    assert "prompt" not in ds.records[0].fields
    # a "prompt" that is not the chat's first question is a different example: which one to train is unclear
    other = {"prompt": "Name a fruit.", "messages": chat}
    with pytest.raises(LorakitError, match=r"^f\.jsonl:3: field 'prompt' \('Name a fruit\.'\) is not the chat's first "
                                           r"user turn \('Name a colour\.'\).*give one of 'prompt' or 'messages'"):
        validate_record(other, "f.jsonl:3")


def test_slimorca_turn_weights_train_the_gpt_turns(tmp_path, tok):
    """Open-Orca/SlimOrca writes a weight on every ShareGPT turn: null on the system turn, 0.0 on the human turn,
    1.0 on the gpt turn. The human turn's 0.0 was refused ("weight 0.0; ... on assistant turns only"), though a
    user turn is never trained anyway; a weight 1 on a user turn (train it) is still refused, lorakit does not."""
    row = {"conversations": [{"from": "system", "value": "Answer briefly.", "weight": None},
                             {"from": "human", "value": "Sky colour?", "weight": 0.0},
                             {"from": "gpt", "value": "Blue.", "weight": 1.0}]}
    ds = build_dataset(read_many(write_jsonl(tmp_path / "slimorca.jsonl", [row])), tok, 128)
    assert targets(tok, ds.rows[0]) == ["Blue.<|im_end|>"]
    assert tok.decode(ds.rows[0]["input_ids"]).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    chat = {"messages": [{"role": "user", "content": "Sky?", "weight": 1}, {"role": "assistant", "content": "Blue."}]}
    with pytest.raises(LorakitError, match=r"^f\.jsonl:2: messages\[0\] \(user\) has weight 1; OpenAI's weight is 0 or "
                                           "1, on assistant turns only"):
        validate_record(chat, "f.jsonl:2")


@pytest.mark.parametrize("row", [
    {"prompt": "Sky colour?", "completion": "Green.", "label": False},  # trl-lib/kto-mix-14k, standard form
    {"prompt": "Sky colour?", "completion": "Green.", "label": 0},  # the same through pandas / a spreadsheet
    {"prompt": [{"role": "user", "content": "Sky colour?"}], "completion": [{"role": "assistant", "content": "Blue."}],
     "label": True},  # TRL's conversational form
])
def test_kto_records_are_refused_as_preference_data(tmp_path, row):
    """A KTO record's "label" says whether its completion is a good answer. It was refused as "unknown field 'label';
    ... remove it", and following that advice trains the bad answers (label false) as if they were good."""
    path = write_jsonl(tmp_path / "kto.jsonl", [row])
    with pytest.raises(LorakitError) as info:
        read_many(path)
    message = str(info.value)
    if isinstance(row["prompt"], str):  # the same rows exported to CSV, where the label is the text "False"
        (tmp_path / "kto.csv").write_text(f"prompt,completion,label\n{row['prompt']},{row['completion']},"
                                          f"{row['label']}\n")
        with pytest.raises(LorakitError, match=r"^kto\.csv:2: a KTO \(unpaired preference\) record"):
            read_many(tmp_path / "kto.csv")
    assert message.startswith("kto.jsonl:1: a KTO (unpaired preference) record: 'label' says whether the completion "
                              "is a good answer"), message
    assert "keep the records with label true (or 1), then delete 'label'" in message and "KTOTrainer" in message
    assert "\n" not in message


def test_tatsu_alpaca_rows_with_their_rendered_text_column(tmp_path, tok):
    """tatsu-lab/alpaca ships a "text" column beside instruction/input/output: the same example rendered in Alpaca's
    prompt. It was refused as "unknown field 'text'", so the best-known instruction set did not train as downloaded;
    it now trains as the Alpaca record it renders (a "text" that is some other text is still refused)."""
    row = {"instruction": "Give a tip for staying healthy.", "input": "",
           "output": "Eat well.", "text": "Below is an instruction that describes a task. Write a response that "
           "appropriately completes the request.\n\n### Instruction:\nGive a tip for staying healthy.\n\n### "
           "Response:\nEat well."}
    ds = build_dataset(read_many(write_jsonl(tmp_path / "alpaca.jsonl", [row])), tok, 128)
    assert tok.decode(ds.rows[0]["input_ids"]) == ("<|im_start|>user\nGive a tip for staying healthy.<|im_end|>\n"
                                                   "<|im_start|>assistant\nEat well.<|im_end|>\n")
    assert targets(tok, ds.rows[0]) == ["Eat well.<|im_end|>"]
    with pytest.raises(LorakitError, match=r"^f\.jsonl:1: unknown field 'text'; an Alpaca record has only"):
        validate_record({**row, "text": "something else"}, "f.jsonl:1")


@pytest.mark.parametrize("orient", [None, "index"])
def test_a_pandas_to_json_file_reads_as_its_rows(tmp_path, tok, orient):
    """``df.to_json("train.json")`` writes pandas' default layout, one object per column ({"prompt": {"0": ..., "1":
    ...}}), which was refused as "field 'prompt' must be a string, got an object"; orient="index" writes one object
    per row under its index. Both read as the rows of the table, each row named by its index."""
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["2+2=", "3+3="], "completion": ["4", "6"]})
    path = tmp_path / "pairs.json"
    frame.to_json(path, **({"orient": orient} if orient else {}))
    records = read_many(path)
    assert [(r.shape, dict(r.fields), r.where) for r in records] == [
        ("prompt_completion", {"prompt": "2+2=", "completion": "4"}, "pairs.json row 0"),
        ("prompt_completion", {"prompt": "3+3=", "completion": "6"}, "pairs.json row 1")]
    assert [targets(tok, row) for row in build_dataset(records, tok, 32).rows] == [["4<|im_end|>"], ["6<|im_end|>"]]
    mixed = pd.DataFrame([{"text": "a b"}, {"prompt": "c", "completion": "d"}])  # a cell another shape fills is null
    mixed.to_json(path, **({"orient": orient} if orient else {}))
    assert [r.shape for r in read_many(path)] == ["text", "prompt_completion"]
    frame.assign(completion=["4", None]).to_json(path, **({"orient": orient} if orient else {}))
    with pytest.raises(LorakitError, match=r"^pairs\.json row 1: 'completion' is null \(an empty cell\); fill it or "
                                           "drop the row$"):
        read_many(path)


def test_a_null_cell_a_row_needs_is_named_as_null(tmp_path):
    """A Parquet row whose completion cell is empty read "missing field 'completion'", while the column is there;
    the cell is null (a null cell counts as absent only so that tables can mix record shapes)."""
    import pandas as pd

    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"prompt": ["2+2=", "3+3="], "completion": ["4", None]}).to_parquet(path)
    with pytest.raises(LorakitError, match=r"^pairs\.parquet row 1: 'completion' is null \(an empty cell\); fill it or "
                                           "drop the row$"):
        read_many(path)


def test_chats_for_a_model_without_a_chat_template_say_how_to_give_it_one(tmp_path):
    """A base model (Llama 3.2 1B, Mistral 7B) has no chat template. ShareGPT data for it stopped with "use
    prompt/completion records", though the usual fix is the instruct model's template in the model folder; Alpaca
    records keep their documented fallback, Alpaca's own prompt format."""
    base = make_tokenizer()
    base.chat_template = None
    path = write_jsonl(tmp_path / "chats.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}])
    with pytest.raises(LorakitError) as info:
        build_dataset(read_many(path), base, 64)
    assert str(info.value) == (
        "chats.jsonl:1: a chat, but this model's tokenizer has no chat template to write it with (a base model?); "
        "put a chat template into the model folder (chat_template.jinja, e.g. its instruct version's), or give "
        "prompt/completion or text records")
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Say hi.", "output": "Hello."}])
    ds = build_dataset(read_many(alpaca), base, 64)
    assert base.decode(ds.rows[0]["input_ids"]) == "### Instruction:\nSay hi.\n\n### Response:\nHello.<|im_end|>"
    assert targets(base, ds.rows[0]) == ["Hello.<|im_end|>"]


def test_openai_preference_files_are_refused_as_preference_data(tmp_path):
    """OpenAI's preference fine-tuning (DPO) JSONL read "no known field in ['input', 'non_preferred_output',
    'preferred_output']", without saying it is preference data or what lorakit trains instead."""
    row = {"input": {"messages": [{"role": "user", "content": "Hello"}], "tools": [], "parallel_tool_calls": True},
           "preferred_output": [{"role": "assistant", "content": "Hi!"}],
           "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}
    with pytest.raises(LorakitError) as info:
        read_many(write_jsonl(tmp_path / "dpo.jsonl", [row]))
    message = str(info.value)
    assert message.startswith("dpo.jsonl:1: a preference (DPO) record (OpenAI's input/preferred_output/"
                              "non_preferred_output); lorakit trains supervised fine-tuning"), message
    assert "{\"messages\": input messages + preferred_output}" in message and "DPOTrainer" in message


def test_a_csv_record_spanning_lines_is_named_by_its_first_line(tmp_path):
    """A cell with newlines (a long answer, code) makes a CSV record span several lines; errors named the record's
    last line, where an editor shows the middle of some other text. They name the line the record starts on, as the
    JSON readers do, across blank lines and CRLF line ends."""
    path = tmp_path / "qa.csv"
    path.write_bytes(b'prompt,completion\r\n2+2=,4\r\n\r\n"Write a poem\r\nabout the sea\r\nin three lines",\r\n3+3=,6\r\n')
    with pytest.raises(LorakitError, match=r"^qa\.csv:4: empty completion"):
        read_many(path)
    path.write_bytes(b'prompt,completion\n"a\nb",x\nc,d,e\n')
    with pytest.raises(LorakitError, match=r"^qa\.csv:4: 3 cells but the header has 2"):
        read_many(path)
    path.write_bytes(b'prompt,completion\n"a\nb",x\n\nc,d\n')
    assert [r.where for r in read_many(path)] == ["qa.csv:2", "qa.csv:5"]


def test_files_concatenated_with_cat(tmp_path):
    """``cat a.jsonl b.jsonl > all.jsonl`` where b.jsonl was written by a Windows tool (PowerShell's Out-File, Notepad)
    puts a byte-order mark at the start of a middle line: it stopped as "malformed JSON (Unexpected UTF-8 BOM ...)";
    the mark is invisible and read past, as on the first line. ``cat a.csv b.csv`` repeats the header line inside
    the data, which trained silently as an example ('prompt' -> 'completion'): it is refused, naming the line."""
    path = tmp_path / "all.jsonl"
    path.write_bytes(b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\r\n')
    assert [(r.where, r["text"]) for r in read_many(path)] == [("all.jsonl:1", "a"), ("all.jsonl:2", "b")]
    for bom in (b"", b"\xef\xbb\xbf"):
        path = tmp_path / "all.csv"
        path.write_bytes(bom + b"prompt,completion\n2+2=,4\n" + bom + b"prompt,completion\n3+3=,6\n")
        with pytest.raises(LorakitError) as info:
            read_many(path)
        assert str(info.value) == ("all.csv:3: this row repeats the header line (files joined with their headers?); "
                                   "remove it")


@pytest.mark.parametrize("record,hint", [
    # LDJnr/Capybara: the hint was "rename it to 'messages'", which then failed on "unknown key 'input'"
    ({"source": "x", "conversation": [{"input": "Hi?", "output": "Hello."}]},
     "'conversation' holds {'input', 'output'} pairs: write each pair as a user and an assistant turn "
     "({\"role\": \"user\", \"content\": input}, {\"role\": \"assistant\", \"content\": output}) under 'messages'"),
    ({"inputs": "2+2=", "targets": "4"}, "rename 'inputs' to 'prompt' and 'targets' to 'completion'"),  # FLAN, P3, xP3
])
def test_rename_hints_lead_to_a_record_that_reads(record, hint):
    with pytest.raises(LorakitError) as info:
        validate_record(record, "f.jsonl:1")
    assert str(info.value).endswith(hint), str(info.value)


# chat templates in the shapes models ship them (trimmed to what a text chat uses), over one BPE with all their tokens
TEMPLATES = {
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
               "m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}", "<|eot_id|>", "<|begin_of_text|>"),
    "gemma": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
              "supported') }}{% endif %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}", "<eos>", "<bos>"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}", "</s>", "<s>"),
    "smollm2": ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
                "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
                "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}", "<|im_end|>", None),
    # Phi-3's: eos after the last turn only when no generation prompt follows, so a chat is not a prefix of a longer one
    "phi3": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}",
             "<|endoftext|>", None),
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<s>", "</s>",
            "[INST]", "[/INST]", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def template_tokenizer(name: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from test_serve_support import TEXT

    template, eos, bos = TEMPLATES[name]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, bos_token=bos, pad_token="<|endoftext|>",
                                   chat_template=template)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_multi_turn_chats_train_exactly_their_assistant_turns(tmp_path, name):
    """A ShareGPT file and the same chats as OpenAI JSONL (one answer given weight 0) through each template: every
    example's tokens are the template's own rendering of the chat (or, for Phi-3's, of the chat up to each answer),
    and the supervised tokens are exactly each trained answer and the token the template ends it with."""
    tok = template_tokenizer(name)
    turns = [("human", "Hello, how are you?"), ("gpt", "I am fine."), ("human", "Capital of France?"),
             ("gpt", "Paris is the capital."), ("human", "And of Germany?"), ("gpt", "Berlin.")]
    sharegpt = {"conversations": [{"from": who, "value": text} for who, text in turns]}
    role = {"human": "user", "gpt": "assistant"}
    messages = [{"role": role[who], "content": text} for who, text in turns]
    openai = {"messages": [{**m, "weight": 0} if m["content"] == "Paris is the capital." else m for m in messages]}
    (tmp_path / "chats.jsonl").write_text(json.dumps(sharegpt) + "\n")
    (tmp_path / "openai.jsonl").write_text(json.dumps(openai) + "\n")
    records = read_many([tmp_path / "chats.jsonl", tmp_path / "openai.jsonl"])
    ds = build_dataset(records, tok, 256)
    end = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>", "smollm2": "<|im_end|>",
           "phi3": "<|end|>"}[name]
    answers = ["I am fine.", "Paris is the capital.", "Berlin."]
    if name == "phi3":  # one example per answer, each the template's rendering of the chat through that answer
        assert ds.summary.per_turn_chats == 2 and len(ds.rows) == 5
        expected = [(messages[:k], [answer]) for k, answer in zip((2, 4, 6), answers)]
        expected += [(messages[:2], [answers[0]]), (messages[:6], [answers[2]])]
    else:
        assert len(ds.rows) == 2
        expected = [(messages, answers), (messages, [answers[0], answers[2]])]
    for row, (chat, trained) in zip(ds.rows, expected):
        rendered = tok.apply_chat_template(chat, tokenize=False)
        assert row["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
        assert targets(tok, row) == [answer + end for answer in trained]
    batch = Collator(tok.pad_token_id)(ds.rows[:2])
    lengths = [len(row["input_ids"]) for row in ds.rows[:2]]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_a_sharegpt_csv_reads_like_a_chat_csv(tmp_path, tok):
    """A CSV cell holds a chat as JSON text, or as the Python repr pandas' to_csv writes for a column of lists: read
    for "messages", but a ShareGPT "conversations" cell was refused ("must be a non-empty list of {from, value}")."""
    import pandas as pd

    chat = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    pd.DataFrame([{"conversations": chat}]).to_csv(tmp_path / "repr.csv", index=False)
    (tmp_path / "json.csv").write_text('conversations\n"' + json.dumps(chat).replace('"', '""') + '"\n')
    (tmp_path / "key.csv").write_text('messages\n"' + json.dumps(chat).replace('"', '""') + '"\n')  # ShareGPT turns
    for name in ("repr.csv", "json.csv", "key.csv"):
        ds = build_dataset(read_many(tmp_path / name), tok, 64)
        assert tok.decode(ds.rows[0]["input_ids"]) == ("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
                                                       "Hello.<|im_end|>\n")
        assert targets(tok, ds.rows[0]) == ["Hello.<|im_end|>"]
    (tmp_path / "bad.csv").write_text('conversations\n"[{from: human}]"\n')
    with pytest.raises(LorakitError, match=r"^bad\.csv:2: field 'conversations' is a string that is not JSON"):
        read_many(tmp_path / "bad.csv")


def test_a_template_that_refuses_a_system_turn_or_repeated_roles_says_what_to_change(tmp_path):
    """Gemma's template raises on a system turn and on two user turns in a row, which OpenAI and ShareGPT files often
    have; the line quoted the template's reason without saying what to change in the data."""
    tok = template_tokenizer("gemma")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}]
    with pytest.raises(LorakitError) as info:
        build_dataset([validate_record({"messages": chat}, "openai.jsonl:3")], tok, 64)
    assert str(info.value) == (
        "openai.jsonl:3: the chat template rejected this chat (System role not supported); this model's template "
        "takes no system turn: put the system text at the start of the first user turn")
    gemma2 = TEMPLATES["gemma"][0].replace("{% if m['role'] == 'system' %}", "{% if (m['role'] == 'user') != "
                                           "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
                                           "alternate user/assistant/user/assistant/...') }}{% endif %}"
                                           "{% if m['role'] == 'system' %}")
    tok.chat_template = gemma2
    chat = [{"role": "user", "content": "Hi?"}, {"role": "user", "content": "Anyone?"},
            {"role": "assistant", "content": "Hello."}]
    with pytest.raises(LorakitError) as info:
        build_dataset([validate_record({"messages": chat}, "openai.jsonl:4")], tok, 64)
    assert str(info.value) == (
        "openai.jsonl:4: the chat template rejected this chat (Conversation roles must alternate user/assistant/user/"
        "assistant/...); this model's template takes turns that alternate between user and assistant: join "
        "consecutive turns of one role into one")


def test_long_chats_under_truncate_and_drop_keep_a_finite_loss(tmp_path, tok):
    """--max-length 48 on three chats: one fits, one whose answer starts past the limit, one whose answer is cut.
    Truncation keeps the cut answer (counted as truncated) and drops the chat left without a target, saying why
    and where; dropping drops both long ones. Every row kept has a target, so a batch's loss is finite."""
    from conftest import tiny_llama

    long_question = " ".join(["Paris is the capital of France."] * 12)
    rows = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Yes."}]},
            {"messages": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": long_question}]}]
    records = read_many(write_jsonl(tmp_path / "long.jsonl", rows))
    cut = build_dataset(records, tok, 48, "truncate")
    assert (cut.summary.examples, cut.summary.truncated, cut.summary.dropped, cut.summary.no_target) == (2, 1, 1, 1)
    assert cut.summary.drop_note() == (
        "note: 1 of 3 examples were dropped: 1 whose prompt fills max_length=48, leaving no target (raise "
        "--max-length or shorten the prompts); the first is long.jsonl:2; 1 example was truncated at max_length=48, "
        f"cutting off {cut.summary.cut_targets} target tokens (78% of all targets: the end of an answer or a text, "
        "later turns), which are not learnt (raise --max-length to keep them)")
    assert len(cut.rows[1]["input_ids"]) == 48 and targets(tok, cut.rows[1])[0].startswith("Paris is the capital")
    dropped = build_dataset(records, tok, 48)
    assert (dropped.summary.examples, dropped.summary.too_long) == (1, 2)
    assert dropped.summary.drop_note().endswith("2 longer than max_length=48 tokens (raise --max-length or pass "
                                                "--overflow truncate); the first is long.jsonl:2")
    model = tiny_llama(vocab_size=len(tok))
    loss = model(**Collator(tok.pad_token_id)(cut.rows)).loss
    assert loss.isfinite() and loss > 0


def test_finetome_and_platypus_rows_with_bookkeeping_columns_train(tmp_path, tok):
    """mlabonne/FineTome-100k (the set of many fine-tuning tutorials) has conversations, source and a quality score,
    garage-bAInd/Open-Platypus a data_source: both were refused as unknown fields, though like "source" they say
    nothing about the text to train."""
    row = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
           "source": "infini-instruct-top-500k", "score": 4.56}
    ds = build_dataset(read_many(write_jsonl(tmp_path / "finetome.jsonl", [row])), tok, 64)
    assert targets(tok, ds.rows[0]) == ["Hello.<|im_end|>"]
    platypus = {"input": "", "output": "4", "instruction": "What is 2+2?", "data_source": "scibench"}  # Open-Platypus
    assert validate_record(platypus)["messages"][-1] == {"role": "assistant", "content": "4"}


@pytest.mark.parametrize("record,message", [
    ({"promt": "2+2=", "completion": "4"}, "f:1: unknown field 'promt'; a prompt_completion record has only 'prompt', "
                                            "'completion': rename 'promt' to 'prompt'"),
    ({"prompt": "2+2=", "completions": "4", "note": "x"},
     "f:1: unknown fields 'completions', 'note'; a prompt_completion record has only 'prompt', 'completion': rename "
     "'completions' to 'completion', remove 'note'"),
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], "tool": []},
     "f:1: unknown field 'tool'; a messages record has only 'messages': rename 'tool' to 'tools'"),
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "contents": "Hello."}]},
     "f:1: messages[1] has unknown key 'contents'; rename it to 'content'"),
    ({"instruction": "Add 2 and 2.", "input": "", "ouput": "4"},
     "f:1: an Alpaca record (with 'instruction') needs 'output' (or Dolly's 'response'); it has 'instruction', 'input', "
     "'ouput': rename 'ouput' to 'output'"),
    ({"instruction": "Add 2 and 2.", "input": ""},
     "f:1: an Alpaca record (with 'instruction') needs 'output' (or Dolly's 'response'); it has 'instruction', "
     "'input'"),
])
def test_a_misspelt_field_is_told_to_be_renamed_not_removed(record, message):
    """A typo in a hand-written file ("promt", "ouput") was told "remove it" (after which the record lacks the field)
    or "no known field", though 'instruction' is one."""
    with pytest.raises(LorakitError) as info:
        validate_record(record, "f:1")
    assert str(info.value) == message


def test_a_hub_dataset_clone_points_to_its_data_folder(tmp_path):
    """A Hugging Face dataset repository (git clone, or a hub snapshot) keeps its files in data/ and, in older
    repositories, a dataset_infos.json at the top: given the repository, lorakit read that metadata as training
    records ("dataset_infos.json: no known field in ['default']"). It is skipped, and the line names data/."""
    repo = tmp_path / "alpaca-repo"
    (repo / "data").mkdir(parents=True)
    (repo / "dataset_infos.json").write_text(json.dumps({"default": {"splits": {"train": {"num_examples": 1}}}}))
    (repo / "README.md").write_text("# a dataset card\n")
    write_jsonl(repo / "data" / "train.jsonl", [{"instruction": "Say hi.", "output": "Hello."}])
    with pytest.raises(LorakitError, match=r"alpaca-repo is a folder with no data files .* it has the subfolder\(s\) "
                                           r"data: give the one with the data"):
        read_many(repo)
    assert [r.where for r in read_many(repo / "data")] == ["train.jsonl:1"]


def test_paths_joined_by_a_comma_are_told_to_be_separate(tmp_path):
    """``--data a.jsonl,b.jsonl`` (or ``data: a.jsonl, b.jsonl`` in a config) read as one missing file."""
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / name, [{"text": "a b"}])
    joined = f"{tmp_path / 'a.jsonl'}, {tmp_path / 'b.jsonl'}"
    with pytest.raises(LorakitError) as info:
        read_many(joined)
    assert str(info.value) == (f"data file not found: {joined}; it names 2 files joined by a comma: give them "
                               "separately (--data a.jsonl b.jsonl; in a config file a list: data: [a.jsonl, b.jsonl])")


def test_a_data_path_under_the_home_folder_is_read(tmp_path, monkeypatch):
    """``data: ~/datasets/train.jsonl`` in a config file, or ``--data=~/...`` (no shell expands ~ after '='), read as
    "data file not found", while --model and --config expand ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a b"}])
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "part.jsonl", [{"text": "c d"}])
    assert [r.where for r in read_many(["~/train.jsonl", "~/data", "~/data/*.jsonl"])] == [
        "train.jsonl:1", "part.jsonl:1", "part.jsonl:1"]


def test_openorca_rows_train_with_their_system_prompt(tmp_path, tok):
    """Open-Orca/OpenOrca ships {id, system_prompt, question, response}: it read as "no known field", and the rename
    it suggested (prompt / completion) then refused system_prompt, so the set could not train with its system
    prompts. It reads as a question/answer record: system turn, question, response as the answer."""
    row = {"id": "niv.242684", "system_prompt": "You are an AI assistant.", "question": "What is 2+2?", "response": "4"}
    ds = build_dataset(read_many(write_jsonl(tmp_path / "orca.jsonl", [row])), tok, 64)
    assert tok.decode(ds.rows[0]["input_ids"]) == ("<|im_start|>system\nYou are an AI assistant.<|im_end|>\n"
                                                   "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
                                                   "4<|im_end|>\n")
    assert targets(tok, ds.rows[0]) == ["4<|im_end|>"]
    alpaca = validate_record({"system_prompt": "Be brief.", "instruction": "Say hi.", "output": "Hi."})
    assert alpaca["messages"][0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(LorakitError, match=r"^f:1: unknown field 'response'; a question/answer record has only"):
        validate_record({"question": "q", "answer": "a", "response": "r"}, "f:1")


def test_null_fields_in_json_count_as_absent_as_in_a_table(tmp_path, tok):
    """A table written as JSON lines (pandas' to_json(orient="records", lines=True)) writes null for a column another
    record shape fills, and OpenHermes-2.5 carries null metadata (topic, model_name, views...): the same rows read from
    Parquet, but from JSON they stopped as "unknown field 'text'". A null that a record needs still stops it."""
    import pandas as pd

    path = tmp_path / "mixed.jsonl"
    pd.DataFrame([{"text": "a b"}, {"prompt": "c", "completion": "d"}]).to_json(path, orient="records", lines=True)
    assert [r.shape for r in read_many(path)] == ["text", "prompt_completion"]
    hermes = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello.", "weight": None}],
              "source": "airoboros2.2", "topic": None, "model_name": None, "views": None, "custom_instruction": None}
    ds = build_dataset(read_many(write_jsonl(tmp_path / "hermes.jsonl", [hermes])), tok, 64)
    assert targets(tok, ds.rows[0]) == ["Hello.<|im_end|>"]
    with pytest.raises(LorakitError, match=r"^f:1: field 'completion' is null; give it a string$"):
        validate_record({"prompt": "q", "completion": None, "note": None}, "f:1")
    with pytest.raises(LorakitError, match=r"^f:2: unknown field 'topic'"):  # a value there is still a mistake
        validate_record({**hermes, "topic": "maths"}, "f:2")


def test_a_datasetdict_with_sft_split_names(tmp_path):
    """HuggingFaceH4's SFT sets (deita-10k-v0-sft, ultrachat_200k) name their splits train_sft / test_sft: a folder
    saved from them was refused ("none of them train"). The one split named for the split asked is read; two such
    (UltraChat's train_sft and train_gen) are named, and the user picks one."""
    import datasets

    def chats(word: str, n: int) -> datasets.Dataset:
        return datasets.Dataset.from_list([{"messages": [{"role": "user", "content": f"{word} {i}?"},
                                                         {"role": "assistant", "content": "ok"}]} for i in range(n)])

    folder = tmp_path / "deita"
    datasets.DatasetDict({"train_sft": chats("train", 3), "test_sft": chats("test", 2)}).save_to_disk(str(folder))
    assert [r.where for r in read_many(folder)] == [f"deita[train_sft] row {i}" for i in range(3)]
    assert [r.where for r in read_many(folder, split=VALIDATION_SPLITS)] == ["deita[test_sft] row 0",
                                                                             "deita[test_sft] row 1"]
    folder = tmp_path / "ultrachat"
    datasets.DatasetDict({"train_sft": chats("a", 1), "train_gen": chats("b", 1), "test_sft": chats("c", 1)}
                         ).save_to_disk(str(folder))
    with pytest.raises(LorakitError) as info:
        read_many(folder)
    assert str(info.value) == (f"{folder}: has the splits train_sft, train_gen for train; give the folder of the one to "
                               f"read (e.g. {folder / 'train_sft'})")


def test_a_hub_data_folder_with_two_train_subsets_is_not_merged(tmp_path):
    """UltraChat 200k's data/ holds train_sft-*.parquet and train_gen-*.parquet (the same prompts, for SFT and for
    generation): --data data/ read both as the train split, every chat twice. Shards of one subset are all read."""
    import pandas as pd

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train_sft-00000-of-00002.parquet", "train_sft-00001-of-00002.parquet",
                 "train_gen-00000-of-00001.parquet", "test_sft-00000-of-00001.parquet"):
        pd.DataFrame([{"prompt": name, "completion": "x"}]).to_parquet(data / name)
    with pytest.raises(LorakitError) as info:
        read_many(data)
    assert str(info.value) == (f"{data}: its train files are of 2 subsets (train_gen, train_sft); give the files of the "
                               f"one to read, e.g. {data / 'train_gen-*'}")
    (data / "train_gen-00000-of-00001.parquet").unlink()
    assert [r["prompt"] for r in read_many(data)] == ["train_sft-00000-of-00002.parquet",
                                                      "train_sft-00001-of-00002.parquet"]


def test_a_mixed_dataframe_reads_with_its_nan_cells_absent(tok):
    """Rows of a pandas DataFrame (what train() turns a DataFrame into) hold NaN, pandas' null, where another record
    shape's column is: {"text": "a b", "prompt": nan, "completion": nan} stopped as "'prompt' must be a string, got
    NaN", while the same table from Parquet reads. A NaN the record needs still stops it, saying so."""
    import pandas as pd

    rows = pd.DataFrame([{"text": "a b"}, {"prompt": "c", "completion": "d"}]).to_dict("records")
    assert rows[0]["prompt"] != rows[0]["prompt"]  # NaN
    ds = build_dataset(rows, tok, 32)
    assert ds.summary.shapes == {"text": 1, "prompt_completion": 1}
    with pytest.raises(LorakitError, match=r"^dataset\[0\]: field 'completion' must be a string, got NaN \(an empty "
                                           r"cell in a pandas export\?\)"):
        build_dataset(pd.DataFrame([{"prompt": "c", "completion": None}]).astype(object).fillna(float("nan"))
                      .to_dict("records"), tok, 32)


def test_a_mixed_table_exported_to_csv_reads(tmp_path, tok):
    """pandas' to_csv of a table mixing record shapes leaves empty the cells of the other shape's columns; those rows
    stopped at "unknown field 'text'" (the Parquet export of the same table reads). An empty cell a record needs,
    or an empty prompt, keeps its meaning."""
    import pandas as pd

    pd.DataFrame([{"text": "a b"}, {"prompt": "c", "completion": "d"}, {"prompt": "", "completion": "e"}]).to_csv(
        tmp_path / "mixed.csv", index=False)
    records = read_many(tmp_path / "mixed.csv")
    assert [(r.shape, dict(r.fields)) for r in records] == [
        ("text", {"text": "a b"}), ("prompt_completion", {"prompt": "c", "completion": "d"}),
        ("prompt_completion", {"prompt": "", "completion": "e"})]
    (tmp_path / "gap.csv").write_text("text,prompt,completion\n,q,\n")
    with pytest.raises(LorakitError, match=r"^gap\.csv:2: empty completion"):
        read_many(tmp_path / "gap.csv")


def test_without_the_optional_readers_the_line_says_what_to_install(tmp_path, monkeypatch):
    """A datasets folder and a Parquet file need lorakit[data] (datasets, pyarrow); without it, one line says so."""
    import pandas as pd

    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    pd.DataFrame([{"text": "a"}]).to_parquet(tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LorakitError, match=r"saved: reading a datasets folder needs the 'datasets' package: pip install "
                                           r"'lorakit\[data\]'$"):
        read_many(folder)
    with pytest.raises(LorakitError, match=r"t\.parquet: reading Parquet needs pyarrow: pip install 'lorakit\[data\]'$"):
        read_many(tmp_path / "t.parquet")
