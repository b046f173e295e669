"""Chats whose chat template rewrites earlier turns train each assistant turn as the template writes it at inference
(lorakit/train/chat_turns.py, lorakit/train/data.py ``render_examples`` / ``tokenize_examples``).

Qwen3's template (below, as its tokenizer_config.json writes it) keeps an assistant turn's ``<think>`` reasoning only
after the last user query, and writes an empty ``<think>\\n\\n</think>`` block into the last turn when it has none, so
``render(messages[:2])`` is not the start of the whole chat. Before: every multi-turn chat (with reasoning or not) was
refused with "the chat template does not render messages[:1] as a prefix of the whole chat", from Python and from
``lorakit train --data`` (with and without ``--pack``). Now each assistant turn is one example: the context is the
inference prompt (earlier turns as the template writes them then), the target is what the model generates after it.
Templates that do render prefixes as prefixes (ChatML) keep one example per chat, unchanged.
"""

from __future__ import annotations

import json
import re

import pytest

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train.data import (
    IGNORE_INDEX,
    build_dataset,
    build_datasets,
    render,
    render_examples,
    tokenize_example,
    tokenize_examples,
)
from lorakit.train.formats import validate_record
from test_serve_support import make_tokenizer, tiny_hf_folder

QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# QwQ / DeepSeek-R1 distills: the generation prompt opens "<think>\n", and every assistant turn is written without
# its reasoning (content.split('</think>')[-1]), so the turn never starts with the prompt
R1_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}{% set c = m.content %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1].lstrip('\\n') %}{% endif %}<|im_start|>assistant\n{{ c }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
# a template that strips <think> from every turn and whose prompt does not open one: the reasoning is never written
STRIP_TEMPLATE = R1_TEMPLATE.replace("<|im_start|>assistant\n<think>\n{% endif %}", "<|im_start|>assistant\n{% endif %}")

ANSWERS = [("What is 2+2?", "Two and two make four.", "4"), ("And 3+3?", "Three and three make six.", "6")]

def qwen3_model_folder(folder):
    """A tiny random Llama folder whose tokenizer carries ``QWEN3_TEMPLATE``; returns (folder, that tokenizer)."""
    from transformers import AutoTokenizer

    folder = tiny_hf_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = QWEN3_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder, tokenizer



def chat(reasoning: str = "reasoning_content") -> dict:
    """Two questions and answers; the reasoning as ``reasoning_content``, inside the content, or absent."""
    messages = [{"role": "system", "content": "Be brief."}]
    for question, thought, answer in ANSWERS:
        messages.append({"role": "user", "content": question})
        if reasoning == "reasoning_content":
            messages.append({"role": "assistant", "content": answer, "reasoning_content": thought})
        elif reasoning == "content":
            messages.append({"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{answer}"})
        else:
            messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def tokenizer_with(template: str):
    tok = make_tokenizer()
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def qwen():
    return tokenizer_with(QWEN3_TEMPLATE)


def targets(example, tok) -> list[str]:
    """The decoded runs of supervised tokens."""
    runs, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


def context(example, tok) -> str:
    """The masked text before the first target: what the model is given."""
    first = next(k for k, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    return tok.decode(example["input_ids"][:first])


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_qwen3_template_rewrites_earlier_turns(qwen):
    """Why the old rule refused these chats, and what the single-example functions say now."""
    messages = chat("none")["messages"]
    full = qwen.apply_chat_template(messages, tokenize=False)
    first = qwen.apply_chat_template(messages[:3], tokenize=False)
    assert first.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n")  # last turn: a think block
    assert "<|im_start|>assistant\n4<|im_end|>" in full and not full.startswith(first)  # earlier turn: none
    record = validate_record(chat("none"), "qwen.jsonl:3")
    for call in (lambda: render(record, qwen), lambda: tokenize_example(record, qwen, 512)):
        with pytest.raises(LorakitError) as info:
            call()
        assert one_line(info) == ("qwen.jsonl:3: this model's chat template rewrites earlier turns, so the chat trains "
                                  "as 2 examples (one per assistant turn); call render_examples or tokenize_examples")


@pytest.mark.parametrize("reasoning", ["reasoning_content", "content", "none"])
def test_each_turn_trains_as_the_template_writes_it_at_inference(qwen, reasoning):
    record = chat(reasoning)
    messages = record["messages"]
    examples = tokenize_examples(record, qwen, 512)
    assert len(examples) == 2
    for k, (example, (_, thought, answer)) in enumerate(zip(examples, ANSWERS)):
        turn = 2 * k + 2  # index of the assistant turn in messages
        as_generated = qwen.apply_chat_template(messages[: turn + 1], tokenize=False)
        prompt = qwen.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        assert example["input_ids"] == qwen(as_generated, add_special_tokens=False)["input_ids"]  # the template's text
        assert context(example, qwen) == prompt  # the context is the inference prompt, nothing more
        shown = f"<think>\n{thought}\n</think>\n\n" if reasoning != "none" else "<think>\n\n</think>\n\n"
        assert targets(example, qwen) == [f"{shown}{answer}<|im_end|>"]  # what the model writes, ended
    assert "<|im_start|>assistant\n4<|im_end|>" in context(examples[1], qwen)  # the first answer as at inference:
    assert ANSWERS[0][1] not in context(examples[1], qwen)  # its reasoning dropped by the template


def test_prefix_templates_keep_one_example_per_chat(qwen):
    """ChatML renders prefixes as prefixes: the fast path gives the same single example as before; so does a
    one-turn Qwen3 chat, and no note is written."""
    chatml = make_tokenizer()
    record = {"messages": chat("none")["messages"] + [{"role": "user", "content": "Thanks"},
                                                       {"role": "assistant", "content": "You are welcome."}]}
    assert render_examples(record, chatml) == [render(record, chatml)]
    assert tokenize_examples(record, chatml, 512) == [tokenize_example(record, chatml, 512)]
    assert targets(tokenize_example(record, chatml, 512), chatml) == ["4<|im_end|>", "6<|im_end|>",
                                                                      "You are welcome.<|im_end|>"]
    single = {"messages": chat("content")["messages"][:3]}
    ds = build_dataset([single], qwen, 512)
    assert ds.summary.examples == 1 and ds.summary.per_turn_chats == 0 and ds.summary.drop_note() is None
    assert targets(ds[0], qwen) == ["<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>"]


def test_a_tool_chain_after_the_last_query_shares_one_example(qwen):
    """Qwen3 keeps reasoning for every turn after the last user query, so the tool call and the final answer are
    one example with two targets; the first answer (before the last query) is an example of its own."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    record = {"tools": tools, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the tool.", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "The tool said sunny."}]}
    examples = tokenize_examples(record, qwen, 1024)
    assert [len(targets(ex, qwen)) for ex in examples] == [1, 2]
    assert targets(examples[0], qwen) == ["<think>\nGreet.\n</think>\n\nHello!<|im_end|>"]
    tool_turn, final = targets(examples[1], qwen)
    assert tool_turn.startswith("<think>\nUse the tool.\n</think>\n\n<tool_call>") and '"get_weather"' in tool_turn
    assert final == "<think>\nThe tool said sunny.\n</think>\n\nIt is sunny.<|im_end|>"
    assert examples[1]["input_ids"] == qwen(qwen.apply_chat_template(record["messages"], tools=tools, tokenize=False),
                                           add_special_tokens=False)["input_ids"]


def test_a_weight_zero_turn_is_context_only(qwen):
    record = chat("reasoning_content")
    record["messages"][2]["weight"] = 0
    examples = tokenize_examples(record, qwen, 512)
    assert len(examples) == 1 and targets(examples[0], qwen) == ["<think>\nThree and three make six.\n</think>\n\n6<|im_end|>"]
    assert "4<|im_end|>" in context(examples[0], qwen)


def test_summary_packing_validation_and_max_length(qwen):
    records = [chat(kind) for kind in ("reasoning_content", "content", "none")] * 2
    ds = build_dataset(records, qwen, 512)
    lengths = [len(row["input_ids"]) for row in ds]
    assert ds.summary.examples == len(ds) == 12 and ds.summary.per_turn_chats == 6 and ds.summary.shapes == {"messages": 6}
    assert ds.summary.tokens == sum(lengths) and len(ds.records) == 6
    assert ds.summary.supervised_tokens == sum(lab != IGNORE_INDEX for row in ds for lab in row["labels"][1:])
    note = ds.summary.drop_note()
    assert note.count("\n") == 0 and note.count("one example per assistant turn") == 1
    assert note.startswith("note: 6 chats trained as one example per assistant turn, because this model's chat "
                           "template rewrites earlier turns")

    packed = build_dataset(records, qwen, 512, pack=True)
    assert packed.summary.examples == 12 and len(packed) < 12
    pieces = []  # the packed rows are the same examples, each starting a fresh position count
    for row in packed:
        start = 0
        for n in row["seq_lens"]:
            pieces.append(tuple(row["input_ids"][start:start + n]))
            start += n
    assert sorted(pieces) == sorted(tuple(row["input_ids"]) for row in ds)

    bundle = build_datasets(validate_records(records), qwen, val_fraction=0.5, max_length=512, pack=True)
    assert bundle.val.summary.examples == 6 and bundle.val.summary.per_turn_chats == 3 and not bundle.val.summary.packed
    assert bundle.train.summary.examples == 6 and bundle.train.summary.packed

    first, second = tokenize_examples(chat("content"), qwen, 512)
    limit = (len(first["input_ids"]) + len(second["input_ids"])) // 2  # the first turn fits, the second does not
    dropped = build_dataset([chat("content")], qwen, limit)
    assert (dropped.summary.examples, dropped.summary.dropped, dropped.summary.too_long) == (1, 1, 1)
    assert dropped[0]["input_ids"] == first["input_ids"] and "1 of 2 examples were dropped" in dropped.summary.drop_note()
    prompt_tokens = next(k for k, label in enumerate(second["labels"]) if label != IGNORE_INDEX)
    cut = build_dataset([chat("content")], qwen, prompt_tokens, overflow="truncate")  # the second turn's context
    assert (cut.summary.examples, cut.summary.no_target) == (1, 1)  # alone fills max_length: nothing of it to learn
    assert targets(cut[0], qwen)[0].startswith("<think>\nTwo and two")  # the first turn trains (cut if need be)
    with pytest.raises(LorakitError, match=r"longer than max_length=8"):
        build_dataset([chat("content")], qwen, 8, overflow="error")


def validate_records(records):
    return [validate_record(r, f"chats.jsonl:{i + 1}") for i, r in enumerate(records)]


def test_a_generation_prompt_that_opens_think(qwen):
    """QwQ / DeepSeek-R1 style: the prompt opens <think> and the turn is written without reasoning; the example is
    the prompt followed by the turn as the model writes it (reasoning, answer, end of turn)."""
    r1 = tokenizer_with(R1_TEMPLATE)
    record = chat("content")
    examples = tokenize_examples(record, r1, 512)
    assert len(examples) == 2
    for example, (_, thought, answer), turn in zip(examples, ANSWERS, (2, 4)):
        prompt = r1.apply_chat_template(record["messages"][:turn], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n") and context(example, r1) == prompt
        assert targets(example, r1) == [f"{thought}\n</think>\n\n{answer}<|im_end|>"]
    assert "<|im_start|>assistant\n4<|im_end|>" in context(examples[1], r1)  # stripped, as the template writes it

    with pytest.raises(LorakitError) as info:
        tokenize_examples(validate_record(chat("none"), "r1.jsonl:2"), r1, 512)
    assert one_line(info).startswith("r1.jsonl:2: this model's chat template starts each answer with '<think>\\n' (its "
                                     "generation prompt) but writes messages[2] as '4<|im_end|>\\n', without reasoning; "
                                     "start the content with the reasoning")
    # the DeepSeek API's reasoning_content, which R1's template never reads, trains as the <think> block it writes
    assert tokenize_examples(chat("reasoning_content"), r1, 512) == examples


def test_a_generation_prompt_with_extra_whitespace():
    """A prompt that adds a newline after the header the turn is written with: the context is that prompt and
    the target the turn, as the model writes it after the prompt."""
    loose = tokenizer_with(make_tokenizer().chat_template.replace("<|im_start|>assistant\n{% endif %}",
                                                                  "<|im_start|>assistant\n\n{% endif %}"))
    record = chat("none")
    ds = build_dataset([record], loose, 512)
    assert ds.summary.per_turn_chats == 1 and len(ds) == 2
    for example, turn, answer in zip(ds, (2, 4), ("4", "6")):
        assert context(example, loose) == loose.apply_chat_template(record["messages"][:turn], tokenize=False,
                                                                    add_generation_prompt=True)
        assert targets(example, loose) == [f"{answer}<|im_end|>"]


def test_reasoning_a_template_drops_is_refused_not_silently_lost():
    strip = tokenizer_with(STRIP_TEMPLATE)
    with pytest.raises(LorakitError) as info:
        build_dataset(validate_records([chat("content")]), strip, 512)
    assert one_line(info) == ("chats.jsonl:1: messages[2] has '<think>...</think>' reasoning in its content, but this "
                              "model's chat template drops it when it writes the turn, so the answer would be learnt "
                              "without it; remove the <think> block, or use a model whose template keeps reasoning")
    assert len(build_dataset([chat("none")], strip, 512)) == 1  # plain answers: a prefix template, one example
    # a template that strips '<think>' blocks (and never reads reasoning_content): the key, tried as a <think> block,
    # is dropped as well
    strip_think = tokenizer_with(STRIP_TEMPLATE.replace("'</think>' in c", "'<think>' in c"))
    with pytest.raises(LorakitError) as info:
        build_dataset(validate_records([chat("reasoning_content")]), strip_think, 512)
    assert one_line(info) == ("chats.jsonl:1: messages[2] has 'reasoning_content', but this model's chat template "
                              "writes it neither as a field nor as '<think>...</think>' in the content, so the answer "
                              "would be learnt without it; remove 'reasoning_content', or use a model whose template "
                              "keeps reasoning")


@pytest.mark.parametrize("flags", [[], ["--pack", "--val-fraction", "0.25"]], ids=["plain", "pack+val"])
def test_cli_trains_a_qwen3_chat_file(tmp_path, flags, capsys):
    folder, tok = qwen3_model_folder(tmp_path / "model")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(chat(kind)) + "\n" for kind in ("reasoning_content", "content", "none") * 2),
                    encoding="utf-8")
    code = main(["train", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps",
                 "1", "--eval-examples", "0", "--rank", "2", "--batch-size", "2", "--no-progress", *flags])
    out = capsys.readouterr().out
    assert code == 0, out
    examples = 12 if not flags else 8  # 6 chats x 2 turns; with --val-fraction 0.25, 2 chats are held out
    assert re.search(rf"training data: {examples} examples \(from {examples // 2} records: {examples // 2} messages\), "
                     "0 dropped", out), out
    # once for the training set, and once more, labelled, for the validation set (since the fifteenth session)
    assert out.count("trained as one example per assistant turn") == (2 if flags else 1), out
    assert out.count("validation data: note: 2 chats trained as one example") == (1 if flags else 0), out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
