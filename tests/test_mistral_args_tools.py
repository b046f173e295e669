"""Tool calling in the format of Mistral's newer tokenizers (v11+: Mistral-Small-3.1 / 3.2, Magistral, Devstral,
Ministral 3): each call written ``[TOOL_CALLS]name[ARGS]{json}``, v11 templates with the call's 9-character id in
between (``[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}``), trained and served through faithful copies of the real chat
templates.

Training: the calls (and any text before them) and the final answer are the targets, checked token by token, the
tool results context; what the template drops (reasoning it does not write) is refused in one line. Serving (real
sockets, the scripted-model server of test_serve_tools): the format is read from the chat template, the calls come
back as OpenAI ``tool_calls`` (the id the model wrote where the format has one) with ``finish_reason`` "tool_calls",
streamed too; tool_choice "required" / a named function starts the answer with the format's call opening; a
malformed call stays content. Before: ``call_format`` returned None for any template with ``[ARGS]``, so a request
with tools was refused ("this template writes another format").
"""

from __future__ import annotations

import json

import pytest

from lorakit.errors import LorakitError
from lorakit.serve.tool_calls import ToolCallStream, call_format, forced_prefix, kept_tokens, parse_calls
from lorakit.train.batches import IGNORE_INDEX
from lorakit.train.data import tokenize_examples
from lorakit.train.formats import validate_record
from test_train_chat_templates import one_line
from test_train_tool_calls import FAMILIES, TOOLS, all_targets, family, weather_chat

# Ministral-3-14B-Instruct-2512's chat_template.jinja (tokenizer v13; Devstral-Small-2 and the other Ministral 3
# models publish the same message loop): calls are "[TOOL_CALLS]name[ARGS]{json}", one after the other, after any
# text, then the end of turn; results "[TOOL_RESULTS]...[/TOOL_RESULTS]"; the tools are written once, after the
# system prompt. As published, but for its long default system message, cut here to its first sentence.
MINISTRAL3 = r"""{#- Default system message if no system prompt is passed. #}
{%- set default_system_message = 'You are Ministral-3-14B-Instruct-2512, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.' %}
{#- Begin of sequence token. #}
{{- bos_token }}
{#- Handle system prompt if it exists. #}
{#- System prompt supports text content or text chunks. #}
{%- if messages[0]['role'] == 'system' %}
    {{- '[SYSTEM_PROMPT]' -}}
    {%- if messages[0]['content'] is string %}
        {{- messages[0]['content'] -}}
    {%- else %}
        {%- for block in messages[0]['content'] %}
            {%- if block['type'] == 'text' %}
                {{- block['text'] }}
            {%- else %}
                {{- raise_exception('Only text chunks are supported in system message contents.') }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '[/SYSTEM_PROMPT]' -}}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
    {%- if default_system_message != '' %}
        {{- '[SYSTEM_PROMPT]' + default_system_message + '[/SYSTEM_PROMPT]' }}
    {%- endif %}
{%- endif %}
{#- Tools definition #}
{%- set tools_definition = '' %}
{%- set has_tools = false %}
{%- if tools is defined and tools is not none and tools|length > 0 %}
    {%- set has_tools = true %}
    {%- set tools_definition = '[AVAILABLE_TOOLS]' + (tools| tojson) + '[/AVAILABLE_TOOLS]' %}
    {{- tools_definition }}
{%- endif %}
{#- Checks for alternating user/assistant messages. #}
{%- set ns = namespace(index=0) %}
{%- for message in loop_messages %}
    {%- if message.role == 'user' or (message.role == 'assistant' and (message.tool_calls is not defined or message.tool_calls is none or message.tool_calls | length == 0)) %}
        {%- if (message['role'] == 'user') != (ns.index % 2 == 0) %}
            {{- raise_exception('After the optional system message, conversation roles must alternate user and assistant roles except for tool calls and results.') }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{#- Handle conversation messages. #}
{%- for message in loop_messages %}
    {#- User messages supports text content or text and image chunks. #}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- elif message['content'] | length > 0 %}
            {{- '[INST]' }}
            {%- if message['content'] | length == 2 %}
                {%- set blocks = message['content'] | sort(attribute='type') %}
            {%- else %}
                {%- set blocks = message['content'] %}
            {%- endif %}
            {%- for block in blocks %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] in ['image', 'image_url'] %}
                    {{- '[IMG]' }}
                {%- else %}
                    {{- raise_exception('Only text, image and image_url chunks are supported in user message content.') }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- else %}
            {{- raise_exception('User message must have a string or a list of chunks in content') }}
        {%- endif %}
    {#- Assistant messages supports text content or text and image chunks. #}
    {%- elif message['role'] == 'assistant' %}
        {%- if (message['content'] is none or message['content'] == '' or message['content']|length == 0) and (message['tool_calls'] is not defined or message['tool_calls'] is none or message['tool_calls']|length == 0) %}
            {{- raise_exception('Assistant message must have a string or a list of chunks in content or a list of tool calls.') }}
        {%- endif %}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- elif message['content'] | length > 0 %}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- else %}
                    {{- raise_exception('Only text chunks are supported in assistant message contents.') }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message['tool_calls'] is defined and message['tool_calls'] is not none and message['tool_calls']|length > 0 %}
            {%- for tool in message['tool_calls'] %}
                {%- set arguments = tool['function']['arguments'] %}
                {%- if arguments is not string %}
                    {%- set arguments = arguments|tojson|safe %}
                {%- elif arguments == '' %}
                    {%- set arguments = '{}' %}
                {%- endif %}
                {{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}
            {%- endfor %}
        {%- endif %}
        {#- End of sequence token for each assistant messages. #}
        {{- eos_token }}
    {#- Tool messages only supports text content. #}
    {%- elif message['role'] == 'tool' %}
        {{- '[TOOL_RESULTS]' + message['content']|string + '[/TOOL_RESULTS]' }}
    {#- Raise exception for unsupported roles. #}
    {%- else %}
        {{- raise_exception('Only user, assistant and tool roles are supported, got ' + message['role'] + '.') }}
    {%- endif %}
{%- endfor %}
"""

# Tekken v11 tokenizers (Mistral-Small-3.2 and the Magistral / Devstral releases of mid 2025): the layout Mistral's
# templates have for v11, as a public generator of Mistral's templates per tokenizer version writes it (found by
# code search: its v11 branch; the message loop is the Ministral 3 one above): each call
# "[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}" with the call's 9-character id, each result
# "[TOOL_RESULTS]id[TOOL_CONTENT]...[/TOOL_RESULTS]", the tools after the system prompt, and Magistral's "thinking"
# content chunks as [THINK]...[/THINK]. The default system message is cut to its first sentence.
MAGISTRAL = r"""{#- Default system message if no system prompt is passed. #}
{%- set default_system_message = 'You are Magistral, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.' %}
{#- Begin of sequence token. #}
{{- bos_token }}
{#- Handle system prompt if it exists. #}
{#- System prompt supports text content or text chunks. #}
{%- if messages[0]['role'] == 'system' %}
    {{- '[SYSTEM_PROMPT]' -}}
    {%- if messages[0]['content'] is string %}
        {{- messages[0]['content'] -}}
    {%- else %}
        {%- for block in messages[0]['content'] %}
            {%- if block['type'] == 'text' %}
                {{- block['text'] }}
            {%- elif block['type'] == 'thinking' %}
                {{- '[THINK]' + block['thinking'] + '[/THINK]' }}
            {%- else %}
                {{- raise_exception('Only text and thinking chunks are supported in system message contents.') }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '[/SYSTEM_PROMPT]' -}}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
    {%- if default_system_message != '' %}
        {{- '[SYSTEM_PROMPT]' + default_system_message + '[/SYSTEM_PROMPT]' }}
    {%- endif %}
{%- endif %}
{#- Tools definition #}
{%- set tools_definition = '' %}
{%- set has_tools = false %}
{%- if tools is defined and tools is not none and tools|length > 0 %}
    {%- set has_tools = true %}
    {%- set tools_definition = '[AVAILABLE_TOOLS]' + (tools| tojson) + '[/AVAILABLE_TOOLS]' %}
    {{- tools_definition }}
{%- endif %}
{#- Checks for alternating user/assistant messages. #}
{%- set ns = namespace(index=0) %}
{%- for message in loop_messages %}
    {%- if message.role == 'user' or (message.role == 'assistant' and (message.tool_calls is not defined or message.tool_calls is none or message.tool_calls | length == 0)) %}
        {%- if (message['role'] == 'user') != (ns.index % 2 == 0) %}
            {{- raise_exception('After the optional system message, conversation roles must alternate user and assistant roles except for tool calls and results.') }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{#- Handle conversation messages. #}
{%- for message in loop_messages %}
    {#- User messages supports text content. #}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- elif message['content'] | length > 0 %}
            {{- '[INST]' }}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- else %}
                    {{- raise_exception('Only text chunks are supported in user message content.') }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- else %}
            {{- raise_exception('User message must have a string or a list of chunks in content') }}
        {%- endif %}
    {#- Assistant messages supports text and thinking content. #}
    {%- elif message['role'] == 'assistant' %}
        {%- if (message['content'] is none or message['content'] == '' or message['content']|length == 0) and (message['tool_calls'] is not defined or message['tool_calls'] is none or message['tool_calls']|length == 0) %}
            {{- raise_exception('Assistant message must have a string or a list of chunks in content or a list of tool calls.') }}
        {%- endif %}
        {%- if message['content'] is string and message['content'] != '' %}
            {{- message['content'] }}
        {%- elif message['content'] | length > 0 %}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] == 'thinking' %}
                    {{- '[THINK]' + block['thinking'] + '[/THINK]' }}
                {%- else %}
                    {{- raise_exception('Only text and thinking chunks are supported in assistant message contents.') }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message['tool_calls'] is defined and message['tool_calls'] is not none and message['tool_calls']|length > 0 %}
            {%- for tool in message['tool_calls'] %}
                {{- '[TOOL_CALLS]' }}
                {%- set name = tool['function']['name'] %}
                {%- set arguments = tool['function']['arguments'] %}
                {%- set id = tool['id']%}
                {%- if id is not defined or id|length != 9 %}
                    {{- raise_exception('Tool call must have an id of 9 characters or numbers.') }}
                {%- endif %}
                {%- if arguments is not string %}
                    {%- set arguments = arguments|tojson|safe %}
                {%- elif arguments == '' %}
                    {%- set arguments = '{}' %}
                {%- endif %}
                {{- name + '[CALL_ID]' + id + '[ARGS]' + arguments }}
            {%- endfor %}
        {%- endif %}
        {{- '</s>' }}
    {#- Tool messages only supports text content. #}
    {%- elif message['role'] == 'tool' %}
        {%- if message['call_id'] is not undefined and message['call_id']|length == 9 %}
            {%- set tool_id = message['call_id'] %}
        {%- elif message['tool_call_id'] is not undefined and message['tool_call_id']|length == 9  %}
            {%- set tool_id = message['tool_call_id'] %}
        {%- else %}
            {{- raise_exception('Tool message must have a call_id or tool_call_id of 9 characters or numbers.') }}
        {%- endif %}
        {{- '[TOOL_RESULTS]' + tool_id + '[TOOL_CONTENT]' + message['content']|string + '[/TOOL_RESULTS]' }}
    {#- Raise exception for unsupported roles. #}
    {%- else %}
        {{- raise_exception('Only user, assistant and tool roles are supported, got ' + message['role'] + '.') }}
    {%- endif %}
{%- endfor %}
"""

MISTRAL_V11_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                        "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "[SYSTEM_PROMPT]",
                        "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]")
FAMILIES.setdefault("ministral3", (MINISTRAL3, MISTRAL_V11_SPECIALS, "<s>", "</s>", "<unk>", ()))
FAMILIES.setdefault("magistral", (MAGISTRAL, MISTRAL_V11_SPECIALS, "<s>", "</s>", "<unk>", ()))
NAMES = {"ministral3": "mistral_args", "magistral": "mistral_call_id"}
OPENAI_ID = "call_Xy7abcdefghi"  # what OpenAI-style data holds; v11 templates get its last 9 characters


def openai_chat(**kwargs) -> dict:
    """:func:`weather_chat` with an OpenAI call id (not 9 characters long)."""
    record = weather_chat(**kwargs)
    record["messages"][2]["tool_calls"][0]["id"] = OPENAI_ID
    record["messages"][3]["tool_call_id"] = OPENAI_ID
    return record


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_example(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """input_ids and labels of a chat written as ``(text, is_target)`` pieces, each cut at special tokens."""
    ids, labels = [], []
    for text, target in pieces:
        piece = _ids(tok, text)
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    return ids, labels


# -- training ----------------------------------------------------------------------------------------------------
SYSTEM_TOOLS = ("<s>[SYSTEM_PROMPT]You are a weather bot.[/SYSTEM_PROMPT][AVAILABLE_TOOLS]"
                + json.dumps(TOOLS) + "[/AVAILABLE_TOOLS][INST]Weather in Paris?[/INST]")


@pytest.mark.parametrize("name, call, result", [
    ("ministral3", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>', '[TOOL_RESULTS]{"temp": 21}[/TOOL_RESULTS]'),
    ("magistral", '[TOOL_CALLS]get_weather[CALL_ID]abcdefghi[ARGS]{"city": "Paris"}</s>',
     '[TOOL_RESULTS]abcdefghi[TOOL_CONTENT]{"temp": 21}[/TOOL_RESULTS]'),
])
def test_calls_are_targets_token_by_token(name, call, result):
    """The call (with the id cut to the 9 characters the v11 template demands, in the call and its result alike) and
    the answer are the targets, token for token; the system prompt, tool list, question and result are context."""
    tok = family(name)
    [example] = tokenize_examples(validate_record(openai_chat(), "tools.jsonl:1"), tok, 4096)
    ids, labels = expected_example(tok, [(SYSTEM_TOOLS, False), (call, True), (result, False),
                                         ("It is 21 degrees.</s>", True)])
    assert example["input_ids"] == ids and example["labels"] == labels
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # the targets are what the template writes for the turn after its prompt (no generation prompt of its own)
    chat = openai_chat()["messages"]
    prompt = tok.apply_chat_template(chat[:2], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert prompt == SYSTEM_TOOLS


@pytest.mark.parametrize("name", list(NAMES))
def test_parallel_calls_text_before_them_and_a_second_round(name):
    """Two calls in one turn (each with its own id), text before the calls, and a second call after the first
    result are each learnt as the template writes them; the results stay context."""
    tok = family(name)
    record = weather_chat(content="Let me check both.")
    turn = record["messages"][2]
    turn["tool_calls"].append({"id": "call_222222222", "type": "function",
                               "function": {"name": "get_weather", "arguments": {"city": "Rome"}}})
    record["messages"][4:4] = [{"role": "tool", "tool_call_id": "call_222222222", "content": "19"},
                               {"role": "assistant", "content": None, "tool_calls": [{
                                   "id": "call_333333333", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                               {"role": "tool", "tool_call_id": "call_333333333", "content": "3"}]
    examples = tokenize_examples(validate_record(record, "tools.jsonl:2"), tok, 4096)
    if name == "ministral3":
        expected = ['Let me check both.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]'
                    '{"city": "Rome"}</s>', '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}</s>', "It is 21 degrees.</s>"]
    else:
        expected = ['Let me check both.[TOOL_CALLS]get_weather[CALL_ID]call12345[ARGS]{"city": "Paris"}[TOOL_CALLS]'
                    'get_weather[CALL_ID]222222222[ARGS]{"city": "Rome"}</s>',
                    '[TOOL_CALLS]get_weather[CALL_ID]333333333[ARGS]{"city": "Oslo"}</s>', "It is 21 degrees.</s>"]
    assert len(examples) == 1 and all_targets(examples, tok) == expected
    text = tok.decode(examples[0]["input_ids"])
    results = ("[TOOL_RESULTS]19[/TOOL_RESULTS]", "[TOOL_RESULTS]3[/TOOL_RESULTS]") if name == "ministral3" else \
        ("[TOOL_RESULTS]222222222[TOOL_CONTENT]19[/TOOL_RESULTS]", "[TOOL_RESULTS]333333333[TOOL_CONTENT]3[/TOOL_RESULTS]")
    assert all(r in text for r in results)


@pytest.mark.parametrize("name", list(NAMES))
def test_the_forms_openai_data_comes_in_train_the_same(name):
    """arguments as an object or JSON text, content null, "" or absent, content as text parts."""
    tok = family(name)
    reference = tokenize_examples(weather_chat(), tok, 4096)
    absent = weather_chat()
    del absent["messages"][2]["content"]
    for record in (weather_chat(""), weather_chat(arguments={"city": "Paris"}), weather_chat(parts=True), absent):
        assert tokenize_examples(record, tok, 4096) == reference


@pytest.mark.parametrize("name", list(NAMES))
def test_what_the_template_drops_is_refused_in_one_line(name):
    """Reasoning under a key the template does not read, or as a 'thinking' part (Magistral's own form, which
    lorakit's text-only records do not take), would leave the call learnt without it: refused, naming the fix."""
    tok = family(name)
    record = weather_chat()
    record["messages"][2]["reasoning_content"] = "The user wants the weather."
    with pytest.raises(LorakitError) as info:
        tokenize_examples(validate_record(record, "tools.jsonl:3"), tok, 4096)
    assert one_line(info).startswith("tools.jsonl:3: messages[2] has 'reasoning_content', but this model's chat "
                                     "template does not write it")
    record = weather_chat()
    record["messages"][2]["content"] = [{"type": "thinking", "thinking": "hmm"}]
    with pytest.raises(LorakitError) as info:
        tokenize_examples(validate_record(record, "tools.jsonl:4"), tok, 4096)
    assert "messages[2]" in one_line(info) and "'thinking' part" in one_line(info)
    # reasoning in the content is text the template writes before the calls: learnt with them
    record = weather_chat(content="<think>\nParis, so get_weather.\n</think>\n\n")
    [call, _] = all_targets(tokenize_examples(record, tok, 4096), tok)
    assert call.startswith("<think>\nParis, so get_weather.\n</think>\n\n[TOOL_CALLS]get_weather[")


# -- serving: format, parser, stream assembly --------------------------------------------------------------------
def test_the_format_is_read_from_the_template():
    """Both layouts are detected; the v0.3 list format and the others are as before; the markers the tokenizer
    marks special are kept in the answer's text for requests whose calls are parsed."""
    assert call_format(family("ministral3"), TOOLS) == "mistral_args"
    assert call_format(family("magistral"), TOOLS) == "mistral_call_id"
    assert [call_format(family(n), TOOLS) for n in ("mistral", "qwen2.5", "llama3.1")] == \
        ["mistral", "hermes", "llama3_json"]
    tok = family("magistral")
    assert kept_tokens(tok, "mistral_call_id") == frozenset(
        tok.convert_tokens_to_ids(["[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"]))
    assert kept_tokens(family("ministral3"), "mistral_args") == frozenset(
        tok.convert_tokens_to_ids(["[TOOL_CALLS]", "[ARGS]"]))


NAMES_GIVEN = {"get_weather", "get_time"}
ARGS_CASES = [  # (text, content, [(name, arguments, id or None)]) ; calls None: the whole text is content
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [("get_weather", {"city": "Paris"}, None)]),
    ('Checking.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}\n', "Checking.",
     [("get_weather", {"city": "Paris"}, None), ("get_time", {}, None)]),
    ('[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]zzzzzzzzz[ARGS] {}',
     None, [("get_weather", {"city": "Paris"}, "a1b2c3d4e"), ("get_time", {}, "zzzzzzzzz")]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Pa', None, None),  # cut by max_tokens
    ('[TOOL_CALLS]get_weather', None, None),
    ('[TOOL_CALLS]rm_rf[ARGS]{}', None, None),  # not a given tool
    ('[TOOL_CALLS]get_weather[ARGS][1, 2]', None, None),  # arguments not an object
    ('[TOOL_CALLS]get_weather[ARGS]{} and then some words', None, None),
    ('[TOOL_CALLS]get_weather[CALL_ID][ARGS]{}', None, None),  # an empty id
    ('[TOOL_CALLS]get_weather[ARGS]{}[TOOL_CALLS]get_time[ARGS]{', None, None),  # the second call cut
    ("It is 21 degrees, [TOOL 21.", None, None),
]


@pytest.mark.parametrize("fmt", ["mistral_args", "mistral_call_id"])
@pytest.mark.parametrize("text, content, calls", ARGS_CASES)
def test_parser(fmt, text, content, calls):
    parsed = parse_calls(text, fmt, NAMES_GIVEN)
    if calls is None:
        assert parsed is None
        return
    assert parsed[0] == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed[1]] == \
        [(n, a) for n, a, _ in calls]
    for call, (_, _, given) in zip(parsed[1], calls):
        assert call["type"] == "function" and (call["id"] == given if given else call["id"].startswith("call_"))
    single = parse_calls(text, fmt, NAMES_GIVEN, single=True)
    assert single[1] == parsed[1][:1] or [c["function"] for c in single[1]] == [parsed[1][0]["function"]]


@pytest.mark.parametrize("fmt", ["mistral_args", "mistral_call_id"])
@pytest.mark.parametrize("text", [case[0] for case in ARGS_CASES] + ["plain answer [TOOL", "x [TOOL_CALL"])
@pytest.mark.parametrize("size", [1, 4, 1000])
def test_stream_assembly_equals_the_answer(fmt, text, size):
    """Fed in pieces of any size, streamed content + the rest at the end is the non-streamed content, and no piece
    of a call is streamed as content."""
    holder = ToolCallStream(NAMES_GIVEN, fmt)
    streamed = "".join(holder.feed(text[i:i + size]) for i in range(0, len(text), size))
    rest, calls = holder.finish()
    parsed = parse_calls(text, fmt, NAMES_GIVEN)
    if parsed is None:
        assert calls is None and streamed + rest == text
    else:
        assert streamed + rest == (parsed[0] or "") and "[TOOL" not in streamed
        assert [c["function"] for c in calls] == [c["function"] for c in parsed[1]]


def test_forced_prefixes_are_the_templates_calls():
    """The start the server writes for tool_choice "required" / a named function is how the template writes an
    earlier call: "[TOOL_CALLS]", then the name and "[ARGS]" (v13) or "[CALL_ID]" (v11: the model writes its id)."""
    call = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]
    for name, fmt in NAMES.items():
        text = family(name).apply_chat_template(call, tools=TOOLS, tokenize=False)
        named = forced_prefix(fmt, "get_weather")
        assert named in text and named.startswith(forced_prefix(fmt, "")) and forced_prefix(fmt, "") == "[TOOL_CALLS]"
        rest = text[text.index(named) + len(named):-len("</s>")]
        assert parse_calls(named + rest, fmt, {"get_weather"})[1][0]["function"] == {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert forced_prefix("mistral_args", "get_weather") == "[TOOL_CALLS]get_weather[ARGS]"
    assert forced_prefix("mistral_call_id", "get_weather") == "[TOOL_CALLS]get_weather[CALL_ID]"


# -- serving over real sockets -----------------------------------------------------------------------------------
CALL_WORDS = {  # what each scripted model writes, greedy, one token per word (the arguments in two)
    "ministral3": ["Let me check.", "[TOOL_CALLS]", "get_weather", "[ARGS]", '{"city": ', '"Paris"}', "</s>"],
    "magistral": ["Let me check.", "[TOOL_CALLS]", "get_weather", "[CALL_ID]", "abcdefghi", "[ARGS]",
                  '{"city": ', '"Paris"}', "</s>"],
}
WEATHER = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.fixture(scope="module", params=list(CALL_WORDS))
def served(request, tmp_path_factory):
    from test_serve_tools import _scripted_server

    name = request.param
    proc, client, tokenizer = _scripted_server(tmp_path_factory.mktemp(name), name, CALL_WORDS[name])
    try:
        yield {"name": name, "url": proc.url, "client": client, "server": proc, "tokenizer": tokenizer}
    finally:
        client.close()
        proc.stop()


def test_served_calls_plain_and_streamed(served):
    """The text before the call is the content, the call a tool_call (its id the one the model wrote where the
    format has one), finish_reason "tool_calls"; streamed, the chunks add up to the same message."""
    from test_serve_tools import _chat, _stream

    client = served["client"]
    choice = _chat(client, tools=TOOLS)["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["content"] == "Let me check."
    [call] = message["tool_calls"]
    assert call["function"] == WEATHER and call["type"] == "function"
    assert call["id"] == "abcdefghi" if served["name"] == "magistral" else call["id"].startswith("call_")
    deltas = [e["choices"][0] for e in _stream(client, tools=TOOLS)]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == "Let me check."
    assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["tool_calls"]
    assert _accumulate(deltas) == [(call["id"] if served["name"] == "magistral" else None, WEATHER)]
    # the call streams as it is written: its head (id, type, name, empty arguments), then each piece of arguments
    parts = [p for d in deltas for p in d["delta"].get("tool_calls") or ()]
    assert parts[0]["function"] == {"name": "get_weather", "arguments": ""} and parts[0]["type"] == "function"
    assert [p["function"] for p in parts[1:]] == [{"arguments": '{"city": '}, {"arguments": '"Paris"}'}]
    assert all("id" not in p and p["index"] == 0 for p in parts[1:])
    # without tools, or with tool_choice "none", the same words are text (the special markers skipped, as before)
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        plain = _chat(client, **extra)["choices"][0]
        assert plain["finish_reason"] == "stop" and "tool_calls" not in plain["message"]
        assert plain["message"]["content"].startswith("Let me check.get_weather")


def _accumulate(deltas: list[dict]) -> list[tuple[str | None, dict]]:
    """The calls of a streamed choice as a client adds them up: by index, the id and name once, the arguments
    concatenated (the id returned only when the format has one: None for generated ids)."""
    calls: dict[int, list] = {}
    for delta in deltas:
        for part in delta["delta"].get("tool_calls") or ():
            entry = calls.setdefault(part["index"], [None, "", ""])
            entry[0] = entry[0] or part.get("id")
            entry[1] += (part.get("function") or {}).get("name") or ""
            entry[2] += (part.get("function") or {}).get("arguments") or ""
    return [(None if (i or "").startswith("call_") else i, {"name": n, "arguments": a})
            for i, n, a in (calls[k] for k in sorted(calls))]


def test_a_malformed_call_stays_content(served):
    """An answer cut inside the call (max_tokens) is no call: its whole text, markers included, is the content
    (finish_reason "length"), plain and streamed; never an error. Streamed, a call cut before its name is complete
    sent nothing; one cut inside its arguments had its head and first arguments sent (they cannot be taken back,
    as with vLLM), and the whole text follows as content."""
    from test_serve_tools import _chat, _stream

    client = served["client"]
    words = CALL_WORDS[served["name"]]
    for cut, sent in ((words.index("get_weather") + 1, []), (words.index('{"city": ') + 1, [(None, {
            "name": "get_weather", "arguments": '{"city": '})])):
        text = "".join(words[:cut])
        choice = _chat(client, tools=TOOLS, max_tokens=cut)["choices"][0]
        # (Magistral's template writes [THINK]: the mistral reasoning parser is on, and found no reasoning)
        assert choice["message"].pop("reasoning_content", None) is None
        assert choice["finish_reason"] == "length" and choice["message"] == {"role": "assistant", "content": text}
        deltas = [e["choices"][0] for e in _stream(client, tools=TOOLS, max_tokens=cut)]
        assert "".join(d["delta"].get("content") or "" for d in deltas) == text
        assert [(None, f) for _, f in _accumulate(deltas)] == sent
        assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["length"]
    assert "Traceback" not in served["server"].output()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_call(served, choice):
    """tool_choice "required" / a named function: the prompt ends with the format's call opening and the model
    continues it; the same call comes back, with fewer tokens generated."""
    from test_serve_tools import _chat, _stream

    client = served["client"]
    answer = _chat(client, tools=TOOLS, tool_choice=choice)
    message = answer["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == [WEATHER]
    opened = 1 if choice == "required" else 3  # [TOOL_CALLS] / [TOOL_CALLS]get_weather[ARGS or CALL_ID]
    assert answer["usage"]["completion_tokens"] == len(CALL_WORDS[served["name"]]) - 1 - opened
    deltas = [e["choices"][0] for e in _stream(client, tools=TOOLS, tool_choice=choice)]
    assert not any(d["delta"].get("content") for d in deltas)
    assert [f for _, f in _accumulate(deltas)] == [WEATHER]


def test_agent_loop_with_the_openai_sdk(served):
    """The openai package reads the call; the reply and a tool result go back, and the prompt is the template's
    rendering of that history token for token (the id the model wrote, or the generated one cut to 9 characters
    where the template wants them)."""
    import openai

    sdk = openai.OpenAI(base_url=served["url"] + "/v1", api_key="none", max_retries=0)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    reply = sdk.chat.completions.create(model="base", messages=question, tools=TOOLS, temperature=0, max_tokens=16)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls[0].function.name == "get_weather"
    # the SDK's own stream accumulation rebuilds the same message from the incremental chunks
    with sdk.chat.completions.stream(model="base", messages=question, tools=TOOLS, temperature=0,
                                     max_tokens=16) as stream:
        events = [event.type for event in stream]
        streamed = stream.get_final_completion().choices[0]
    assert events.count("tool_calls.function.arguments.delta") == 3  # the head (empty arguments), then two pieces
    assert streamed.finish_reason == "tool_calls" and streamed.message.content == message.content
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in message.tool_calls]
    history = [*question, message.model_dump(),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temp": 21}'}]
    second = sdk.chat.completions.create(model="base", messages=history, tools=TOOLS, temperature=0, max_tokens=16)
    call_id = message.tool_calls[0].id[-9:]
    expected = served["tokenizer"].apply_chat_template(
        [*question, {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'}], tools=TOOLS, tokenize=False)
    assert 'Let me check.[TOOL_CALLS]get_weather[' in expected and '[ARGS]{"city": "Paris"}</s>' in expected
    if served["name"] == "magistral":
        assert "[CALL_ID]abcdefghi[ARGS]" in expected and "[TOOL_RESULTS]abcdefghi[TOOL_CONTENT]" in expected
    assert second.usage.prompt_tokens == len(served["tokenizer"](expected, add_special_tokens=False)["input_ids"])
    assert "Traceback" not in served["server"].output()


# -- streamed calls, incrementally, for every format ---------------------------------------------------------------
STREAM_CASES = [  # (format, answer with two calls, the second's arguments as JSON text where the format allows it)
    ("hermes", 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>'
               '\n<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"arguments": {"city":"Paris"}, "name": "get_weather"}\n</tool_call>'),  # name last
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'),
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}, '
                '{"name": "get_time", "arguments": {"zone":  "CET"}}]'),
    ("mistral_args", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "note": "a } and a \\" inside"}'
                     '[TOOL_CALLS]get_time[ARGS]{}'),
    ("mistral_call_id", '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city":"Paris"}'
                        '[TOOL_CALLS]get_time[CALL_ID]f5g6h7i8j[ARGS] {"zone": "CET"}'),
]


@pytest.mark.parametrize("fmt, text", STREAM_CASES)
@pytest.mark.parametrize("size", [1, 5, 1000])
def test_incremental_call_deltas_add_up_to_the_parsed_calls(fmt, text, size):
    """Fed in pieces, each call's head comes first (id, type, name, empty arguments), then its arguments in pieces
    as written; joined by index they are the non-streamed calls, ids included (the model's where it wrote one)."""
    holder = ToolCallStream(NAMES_GIVEN, fmt, incremental=True)
    content, parts = "", []
    for i in range(0, len(text), size):
        content += holder.feed(text[i:i + size])
        parts += holder.call_deltas()
    rest, calls = holder.finish()
    parts += holder.rest_deltas(calls)
    content += rest
    expected = parse_calls(text, fmt, NAMES_GIVEN)
    assert content == (expected[0] or "")
    joined: dict[int, dict] = {}
    for part in parts:
        if "id" in part:  # a head: once per call, before its arguments
            assert part["index"] not in joined and part["type"] == "function"
            joined[part["index"]] = {"id": part["id"], "type": "function", "function": dict(part["function"])}
        else:
            joined[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    assert [joined[i] for i in sorted(joined)] == calls
    assert [c["function"] for c in calls] == [c["function"] for c in expected[1]]
    for call, want in zip(calls, expected[1]):
        assert call["id"] == want["id"] or (want["id"].startswith("call_") and call["id"].startswith("call_"))
    pieces = [p for p in parts if "id" not in p and p["index"] == 0]
    if size == 1 and not text.startswith('<tool_call>\n{"arguments"'):  # arguments stream in several pieces
        assert len(pieces) > 3  # (written before the name, they are whole when the call's head goes out)


def test_the_stream_events_read_by_the_openai_sdk():
    """In process, the server's chunks for every format (two calls each) as the openai package accumulates them
    (``ChatCompletionStreamState``): the same message as the non-streamed answer."""
    import asyncio
    from types import SimpleNamespace

    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    from lorakit.serve.answers import stream_events

    for fmt, text in STREAM_CASES:
        queue = asyncio.Queue()
        for k in range(0, len(text), 3):
            queue.put_nowait(("token", 0, text[k:k + 3], 1, None, k // 3 + 1))  # (.., settled tokens)
        queue.put_nowait(("done", 0, "", "stop", -(-len(text) // 3)))
        body = SimpleNamespace(stream_options=None, model="m", forced_call=lambda: None,
                               return_tokens_as_token_ids=False, return_token_ids=False)  # vLLM's: off
        state = SimpleNamespace(engine=SimpleNamespace(cancel=lambda job: None))

        async def run():
            return [chunk async for chunk in stream_events(state, body, [SimpleNamespace(tokens=[1])],
                                                           SimpleNamespace(queue=queue), "chatcmpl-x", 0, True, 3,
                                                           None, (fmt, NAMES_GIVEN, False))]

        raw = asyncio.run(run())
        assert raw[-1] == "data: [DONE]\n\n"
        accumulated = ChatCompletionStreamState()
        for block in raw[:-1]:
            accumulated.handle_chunk(ChatCompletionChunk.model_validate(json.loads(block[6:])))
        choice = accumulated.get_final_completion().choices[0]
        content, calls = parse_calls(text, fmt, NAMES_GIVEN)
        assert choice.finish_reason == "tool_calls" and (choice.message.content or None) == content, fmt
        assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in calls], fmt
        assert len(raw) > 6 or "get_time" not in text, fmt  # two calls come in several chunks


def test_cli_trains_magistral_tool_chats(tmp_path, capsys):
    """``lorakit train --data`` on OpenAI tool records (long call ids) with Magistral's template: the run completes,
    the ids are cut to the template's 9 characters (the note says so), and the adapter is written."""
    from conftest import tiny_llama

    from lorakit.cli import main

    tok = family("magistral")
    folder = tmp_path / "model"
    tiny_llama(vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    records = []
    for t in range(5):
        record = openai_chat(final=f"It is {t} degrees.")
        record["messages"][2]["tool_calls"][0]["id"] = record["messages"][3]["tool_call_id"] = f"call_{t}bc123xyz"
        records.append(json.dumps(record) + "\n")
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(records), encoding="utf-8")
    code = main(["train", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps",
                 "1", "--val-fraction", "0.2", "--rank", "2", "--batch-size", "1", "--no-progress",
                 "--max-length", "512"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "training data: 4 examples" in out, out
    assert "the tool call ids of 4 chats were cut to the 9 characters" in out, out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("fmt, head", [("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"a": '),
                                       ("llama3_json", '{"name": "get_weather", "parameters": {"a": '),
                                       ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"a": '),
                                       ("mistral_args", '[TOOL_CALLS]get_weather[ARGS]{"a": ')])
def test_arguments_nested_deeper_than_json_recurses_stay_content(fmt, head):
    """A model can write more nesting than Python's json recurses (RecursionError, not ValueError): the answer is
    content, parsed or streamed, never an error."""
    text = head + "[" * 50_000 + "]" * 50_000 + "}}" + ("]" if fmt == "mistral" else "")
    assert parse_calls(text, fmt, NAMES_GIVEN) is None
    holder = ToolCallStream(NAMES_GIVEN, fmt, incremental=True)
    streamed = holder.feed(text[:len(head) + 10]) + holder.feed(text[len(head) + 10:])
    holder.call_deltas()
    rest, calls = holder.finish()
    assert calls is None and streamed + rest == text
