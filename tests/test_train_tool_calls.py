"""Chat training data with OpenAI tool use, through the real chat templates of the model families users bring.

Each template below reproduces the logic of its model's ``tokenizer_config.json`` (Llama 3.1, Qwen2.5, Qwen3,
Mistral v0.3, Hermes 2 Pro / 3, DeepSeek-R1 (January 2025) and DeepSeek-V3.1), set on a tiny byte-level BPE tokenizer
with that family's special tokens. Records are in OpenAI's fine-tuning format: ``tools`` beside ``messages``, an
assistant turn with ``content`` null and ``tool_calls`` whose ``arguments`` is a JSON string, a ``tool`` turn with
``tool_call_id``, then the final answer. The assistant's calls and answers are the targets, as the template writes them
after its generation prompt; everything else is context. Before: Mistral (system prompt and tool list written into
the LAST user turn only) and Hermes (a tool result closed differently when it ends the chat) were refused with
"assistant turn cannot be located"; DeepSeek templates failed on the dict arguments lorakit handed them ("can only
concatenate str"); a DeepSeek-R1 tool turn was refused with the reasoning error and, with reasoning, the call was lost;
text beside a call that Llama 3.1 / Hermes do not write was silently not learnt.
"""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train.data import build_dataset, build_datasets, generation_prompt, tokenize_examples
from lorakit.train.formats import validate_record
from test_serve_support import TEXT
from test_train_chat_templates import QWEN3_TEMPLATE, context, one_line, targets


LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

MISTRAL = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# DeepSeek-R1 (January 2025 tokenizer_config.json, one line there): tool calls are written only when content is none
DEEPSEEK_R1 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")

HERMES = r"""{%- macro json_to_python_type(json_spec) %}
{%- set basic_type_map = {"string": "str", "number": "float", "integer": "int", "boolean": "bool"} %}
{%- if basic_type_map[json_spec.type] is defined %}
    {{- basic_type_map[json_spec.type] }}
{%- elif json_spec.type == "array" %}
    {{- "list[" +  json_to_python_type(json_spec|items) + "]"}}
{%- elif json_spec.type == "object" %}
    {{- "dict" }}
{%- else %}
    {{- "Any" }}
{%- endif %}
{%- endmacro %}
{{- bos_token }}
{%- if tools is iterable and tools | length > 0 %}
{{- '<|im_start|>system\n' }}
{{- "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about what values to plug into functions. Here are the available tools: <tools> " }}
{%- for tool in tools %}
    {%- if tool.function is defined %}
        {%- set tool = tool.function %}
    {%- endif %}
    {{- '{"type": "function", "function": ' }}
    {{- '{"name": "' + tool.name + '", ' }}
    {{- '"description": "' + tool.name + '(' }}
    {%- for param_name, param_fields in tool.parameters.properties|items %}
        {{- param_name + ": " + json_to_python_type(param_fields) }}
        {%- if not loop.last %}
            {{- ", " }}
        {%- endif %}
    {%- endfor %}
    {{- ")" }}
    {{- '", "parameters": ' }}
    {{- tool.parameters|tojson }}
    {{- "}" }}
{%- endfor %}
{{- " </tools>" }}
{{- 'Use the following pydantic model json schema for each tool call you will make: {"properties": {"name": {"title": "Name", "type": "string"}, "arguments": {"title": "Arguments", "type": "object"}}, "required": ["name", "arguments"], "title": "FunctionCall", "type": "object"}
' }}
{{- "For each function call return a json object with function name and arguments within <tool_call></tool_call> XML tags as follows:
" }}
{{- "<tool_call>
" }}
{{- '{"name": <function-name>, "arguments": <args-dict>}
' }}
{{- '</tool_call><|im_end|>
' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or message.role == "system" or (message.role == "assistant" and message.tool_calls is not defined) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
    {%- for tool_call in message.tool_calls %}
       {{- '\n<tool_call>\n' }}           {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '{' }}
            {{- '"name": "' }}
            {{- tool_call.name }}
            {{- '"' }}
            {{- ', '}}
            {%- if tool_call.arguments is defined %}
                {{- '"arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments|tojson }}
                {%- endif %}
            {%- endif %}
             {{- '}' }}
            {{- '\n</tool_call>' }}
    {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>tool\n' }}
        {%- endif %}
        {{- '<tool_response>\n' }}
        {{- message.content }}
        {%- if not loop.last %}
            {{- '\n</tool_response>\n' }}
        {%- else %}
            {{- '\n</tool_response>' }}
        {%- endif %}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>' }}
        {%- elif loop.last %}
            {{- '<|im_end|>' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# DeepSeek-V3.1 (also R1-0528-era): calls written after the content, arguments concatenated as a JSON string
DEEPSEEK_V31 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true, is_last_user=false) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{% set content = message['content'] %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{%- set ns.is_first = false -%}{%- set ns.is_last_user = true -%}"
    "{{'<｜User｜>' + content + '<｜Assistant｜>'}}{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}{% endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] is not none %}"
    "{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{%- endif %}{%- set ns.is_first = false %}"
    "{%- set ns.is_tool = false -%}{%- set ns.is_output_first = true %}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}"
    "{%- if content is none %}{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- else %}{{content + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and (message['tool_calls'] is not defined or message['tool_calls'] is none)%}"
    "{%- set ns.is_last_user = false -%}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- set ns.is_tool = false -%}{%- else %}{{content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}"
    "{%- else %}{{'\\n<｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_last_user and not ns.is_tool %}{{'<｜Assistant｜>'}}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{% endif %}")

LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>")
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
DEEPSEEK_SPECIALS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                     "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                     "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                     "<｜tool▁output▁end｜>", "<｜▁pad▁｜>")
# family: (template, special tokens, bos (added by the tokenizer) or None, eos, pad, plain added tokens)
FAMILIES = {
    "llama3.1": (LLAMA31, LLAMA_SPECIALS, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", ()),
    "qwen2.5": (QWEN25, CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>", ("<tool_call>", "</tool_call>")),
    "qwen3": (QWEN3_TEMPLATE, CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>",
              ("<tool_call>", "</tool_call>", "<think>", "</think>")),
    "mistral": (MISTRAL, MISTRAL_SPECIALS, "<s>", "</s>", "<unk>", ()),
    "hermes": (HERMES, LLAMA_SPECIALS[:2] + CHATML_SPECIALS[1:], "<|begin_of_text|>", "<|im_end|>", "<|end_of_text|>",
               ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")),
    "deepseek-v3.1": (DEEPSEEK_V31, DEEPSEEK_SPECIALS, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>",
                      ("<think>", "</think>")),
    "deepseek-r1": (DEEPSEEK_R1, DEEPSEEK_SPECIALS, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>",
                    ("<think>", "</think>")),
}
_TOKENIZERS: dict = {}


def build_tokenizer(template: str, specials, bos, eos, pad, added=()):
    """A tiny byte-level BPE tokenizer with these special tokens, chat template and plain added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos:  # Llama, Mistral and DeepSeek tokenizers put BOS in front by default
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=pad,
                                   chat_template=template)
    fast.add_tokens(list(added))
    return fast


def family(name: str):
    """A family's tokenizer (:data:`FAMILIES`), built once."""
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = build_tokenizer(*FAMILIES[name])
    return _TOKENIZERS[name]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL_ID = "call12345"  # Mistral's template wants 9 characters


def weather_chat(content=None, arguments='{"city": "Paris"}', parts: bool = False, final: str = "It is 21 degrees.") -> dict:
    """OpenAI's fine-tuning format: a system prompt, a question, a call (content null, arguments a JSON string), the
    tool's result and the final answer; ``parts`` writes every content as a list of text parts."""
    def text(value):
        return [{"type": "text", "text": value}] if parts and value is not None else value

    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": text("You are a weather bot.")},
        {"role": "user", "content": text("Weather in Paris?")},
        {"role": "assistant", "content": text(content), "tool_calls": [
            {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": CALL_ID, "content": text('{"temp": 21}')},
        {"role": "assistant", "content": text(final)}]}


# what each template writes for the call and the answer (the targets), each ended by its end-of-turn token
EXPECTED = {
    "llama3.1": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "It is 21 degrees.<|eot_id|>"],
    "qwen2.5": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                "It is 21 degrees.<|im_end|>"],
    "qwen3": ['<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
              "<|im_end|>", "<think>\n\n</think>\n\nIt is 21 degrees.<|im_end|>"],
    "mistral": ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call12345"}]</s>',
                " It is 21 degrees.</s>"],
    "hermes": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
               "It is 21 degrees.<|im_end|>"],
    "deepseek-v3.1": ["<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                      '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>',
                      "It is 21 degrees.<｜end▁of▁sentence｜>"],
}


def all_targets(examples, tok) -> list[str]:
    return [run for example in examples for run in targets(example, tok)]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_calls_and_answers_are_the_targets(name):
    """The call turn and the final answer are learnt as the template writes them, every other turn is context; each
    example's context is the template's own inference prompt for that turn, with the tool list in it."""
    tok = family(name)
    record = weather_chat()
    if name == "deepseek-v3.1":  # its template has no tools section: DeepSeek's card puts them in the system message
        del record["tools"]
    examples = tokenize_examples(validate_record(record, "tools.jsonl:1"), tok, 4096)
    assert all_targets(examples, tok) == EXPECTED[name]
    # the context of the first call is the prompt the model is given at inference, with the tool list in it
    prompt = tok.apply_chat_template(record["messages"][:2], tools=record.get("tools"), tokenize=False,
                                     add_generation_prompt=True)
    assert context(examples[0], tok) == (tok.bos_token if tok.bos_token and not prompt.startswith(tok.bos_token)
                                         else "") + prompt
    assert ("get_weather" in prompt) == (name != "deepseek-v3.1")  # the record's tools reached the template
    for example in examples:  # system, user and tool turns are context only
        assert not any(text in run for run in targets(example, tok) for text in ("weather bot", "Paris?", '"temp"'))


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5", "mistral", "hermes", "deepseek-v3.1"])
def test_the_forms_openai_data_comes_in_train_the_same(name):
    """arguments as an object or a JSON string, content null, "" or absent, every content as text parts."""
    tok = family(name)
    tools = {"tools": json.dumps(TOOLS)} if name != "deepseek-v3.1" else {}  # a CSV cell holds them as JSON text
    reference = tokenize_examples({**without_tools(name), **tools}, tok, 4096)
    absent = without_tools(name)
    del absent["messages"][2]["content"]
    for record in (without_tools(name, ""), without_tools(name, arguments={"city": "Paris"}),
                   without_tools(name, parts=True), absent):
        assert tokenize_examples(record, tok, 4096) == reference


def without_tools(name: str, *args, **kwargs) -> dict:
    """:func:`weather_chat`, without ``tools`` for DeepSeek's templates, which have no tools section."""
    record = weather_chat(*args, **kwargs)
    if name.startswith("deepseek"):
        del record["tools"]
    return record


def test_tools_a_template_does_not_write_are_refused():
    """DeepSeek's templates ignore ``tools``: the calls would be learnt without the schemas the model is shown, so
    the record is refused with the fix (the model card's way: the schemas in the system message)."""
    with pytest.raises(LorakitError) as info:
        tokenize_examples(validate_record(weather_chat(), "tools.jsonl:8"), family("deepseek-v3.1"), 4096)
    assert one_line(info) == ("tools.jsonl:8: field 'tools' ('get_weather') is not written by this model's chat "
                              "template (it has no tools section), so the model would learn without the schemas; "
                              "describe the tools in the system message, as this model's card says, and remove 'tools', "
                              "or use a model whose template writes them")


def test_mistral_writes_the_system_prompt_and_tools_into_the_last_user_turn_only():
    """Mistral v0.3 renders the context differently once an answer follows it, so each turn is its own example whose
    context is exactly the inference prompt (system prompt included), and the summary says why."""
    tok = family("mistral")
    record = validate_record(weather_chat(), "tools.jsonl:3")
    prompt = tok.apply_chat_template(record["messages"][:2], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("[INST] You are a weather bot.\n\nWeather in Paris?[/INST]")
    assert "You are a weather bot." not in tok.apply_chat_template(record["messages"], tools=TOOLS, tokenize=False)
    ds = build_dataset([record], tok, 4096)
    assert len(ds) == 2 and ds.summary.per_turn_chats == 1 and "one example per assistant turn" in ds.summary.drop_note()
    assert context(ds[0], tok) == prompt
    assert ds[0]["input_ids"] == tok(prompt + EXPECTED["mistral"][0], add_special_tokens=False)["input_ids"]


def test_a_chat_that_ends_with_the_call_and_parallel_calls():
    """OpenAI sets often end at the call; a turn may call several tools (Qwen writes them all; Llama 3.1's template
    refuses more than one, which is reported with the record)."""
    record = weather_chat()
    record["messages"] = record["messages"][:3]
    qwen = family("qwen2.5")
    assert all_targets(tokenize_examples(record, qwen, 4096), qwen) == EXPECTED["qwen2.5"][:1]
    two = weather_chat()
    call = two["messages"][2]["tool_calls"][0]
    two["messages"][2]["tool_calls"] = [call, {**call, "id": "call67890", "function": {
        "name": "get_weather", "arguments": '{"city": "Berlin"}'}}]
    two["messages"].insert(4, {"role": "tool", "tool_call_id": "call67890", "content": '{"temp": 18}'})
    call_turn = all_targets(tokenize_examples(two, qwen, 4096), qwen)[0]
    assert call_turn.count("<tool_call>") == 2 and '"Berlin"' in call_turn
    mistral = family("mistral")
    assert '"Berlin"}, "id": "call67890"}]</s>' in all_targets(tokenize_examples(two, mistral, 4096), mistral)[0]
    with pytest.raises(LorakitError) as info:
        tokenize_examples(validate_record(two, "tools.jsonl:7"), family("llama3.1"), 4096)
    assert one_line(info) == ("tools.jsonl:7: the chat template rejected this chat (This model only supports single "
                              "tool-calls at once!)")


def test_text_beside_a_call():
    """Qwen2.5 writes the text and then the call: both are learnt. Llama 3.1 and Hermes write only the call: the
    text would be lost, so the record is refused with the fix."""
    record = weather_chat("Let me check.")
    qwen = family("qwen2.5")
    assert all_targets(tokenize_examples(record, qwen, 4096), qwen)[0] == (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
    for name in ("llama3.1", "hermes"):
        with pytest.raises(LorakitError) as info:
            tokenize_examples(validate_record(record, "tools.jsonl:2"), family(name), 4096)
        assert one_line(info) == ("tools.jsonl:2: messages[2] has text beside its tool calls, but this model's chat "
                                  "template writes only the calls, so 'Let me check.' would not be learnt; move the text "
                                  "into an assistant turn of its own or remove it (content null)")


def test_deepseek_r1_template():
    """DeepSeek-R1's template (January 2025, also its distills') writes a turn's calls only when ``message['content']
    is none`` and concatenates ``arguments`` as a JSON string; transformers 5 removes None-valued keys before a template
    runs. Before: refused ("cannot be located" or the reasoning error) and, with reasoning, the call was lost. Now a
    call turn trains as R1 writes it after its ``<think>\n`` prompt: the reasoning, then the calls."""
    tok = family("deepseek-r1")
    record = without_tools("deepseek-r1", "<think>\nI need the weather tool.\n</think>\n\n",
                           final="<think>\nThe tool says 21.\n</think>\n\nIt is 21 degrees.")
    first, second = tokenize_examples(record, tok, 4096)
    prompt = tok.apply_chat_template(weather_chat()["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜><think>\n") and context(first, tok) == prompt
    assert targets(first, tok) == ["I need the weather tool.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
                                   'function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>'
                                   "<｜end▁of▁sentence｜>"]  # the template does not end a single call: eos is added
    assert targets(second, tok) == ["<think>\nThe tool says 21.\n</think>\n\nIt is 21 degrees.<｜end▁of▁sentence｜>"]
    assert context(second, tok).endswith('<｜tool▁output▁begin｜>{"temp": 21}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>')

    with pytest.raises(LorakitError) as info:  # the <think> prompt needs the reasoning the call follows
        tokenize_examples(validate_record(without_tools("deepseek-r1"), "r1.jsonl:5"), tok, 4096)
    assert one_line(info).startswith("r1.jsonl:5: this model's chat template starts each answer with '<think>\\n' (its "
                                     "generation prompt) but writes messages[2] as '<｜tool▁calls▁begin｜>")
    assert "before the calls)" in str(info.value)
    with pytest.raises(LorakitError) as info:  # text beside the call: the template writes the text, not the call
        tokenize_examples(validate_record(without_tools("deepseek-r1", "Let me check."), "r1.jsonl:6"), tok, 4096)
    assert one_line(info) == ("r1.jsonl:6: messages[2] calls tool 'get_weather', but this model's chat template does "
                              "not write the calls of a turn that also has text (DeepSeek-R1's writes them only when the "
                              "content is empty): move the text 'Let me check.' into an assistant turn of its own or "
                              "remove it")


# community ChatML tool templates: one prints the arguments as they come, one leaves them out
RAW_ARGUMENTS = QWEN25.replace("{{- tool_call.arguments | tojson }}", "{{- tool_call.arguments }}")
NO_ARGUMENTS = QWEN25.replace("{{- tool_call.arguments | tojson }}", "{{- '{}' }}")


def test_templates_that_print_arguments_raw_or_drop_them():
    """A template that prints ``arguments`` as given would write the validated dict as Python (``{'city': 'Paris'}``):
    it gets the JSON text instead. One that does not write them is refused (the call would be learnt without them)."""
    tok = family("qwen2.5")
    try:
        tok.chat_template = RAW_ARGUMENTS
        call = all_targets(tokenize_examples(weather_chat(arguments={"city": "Paris"}), tok, 4096), tok)[0]
        assert '"arguments": {"city": "Paris"}}' in call and "'city'" not in call
        tok.chat_template = NO_ARGUMENTS
        with pytest.raises(LorakitError) as info:
            tokenize_examples(validate_record(weather_chat(), "tools.jsonl:9"), tok, 4096)
        assert one_line(info) == ("tools.jsonl:9: messages[2] calls tool 'get_weather', but this model's chat template "
                                  "does not write its argument 'city'; use a model whose template writes tool arguments, "
                                  "or prompt/completion records")
    finally:
        tok.chat_template = QWEN25


def test_weight_zero_on_a_call_and_a_train_flag():
    """OpenAI's per-message ``weight``: a call turn with weight 0 is context, the answer after it is learnt. A
    ``train`` flag (another trainer's name for it) is refused, naming the key lorakit reads."""
    tok = family("hermes")
    record = weather_chat()
    record["messages"][2]["weight"] = 0
    examples = tokenize_examples(record, tok, 4096)
    assert all_targets(examples, tok) == EXPECTED["hermes"][1:]
    assert '"get_weather", "arguments": {"city": "Paris"}' in context(examples[-1], tok)
    record["messages"][2] = {**record["messages"][2], "train": False}
    del record["messages"][2]["weight"]
    with pytest.raises(LorakitError) as info:
        validate_record(record, "tools.jsonl:5")
    assert "unknown key 'train'" in one_line(info) and "'weight'" in str(info.value)


def test_max_length_packing_and_validation_with_tool_chats():
    """Truncation keeps the call and cuts the answer; a chat that does not fit is dropped with a note; packing and a
    held-out validation share keep every example (Mistral's per-turn examples included)."""
    tok = family("qwen2.5")
    (whole,) = tokenize_examples(weather_chat(), tok, 4096)
    answer_at = len(whole["labels"]) - len(tok("It is 21 degrees.<|im_end|>\n", add_special_tokens=False)["input_ids"])
    cut = build_dataset([weather_chat()], tok, answer_at + 2, overflow="truncate")
    assert cut.summary.truncated == 1 and targets(cut[0], tok)[0] == EXPECTED["qwen2.5"][0]
    dropped = build_dataset([weather_chat(), {"messages": [{"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Hello."}]}], tok, answer_at)
    assert (dropped.summary.examples, dropped.summary.too_long) == (1, 1)

    mistral = family("mistral")
    records = [validate_record(weather_chat(final=f"It is {t} degrees."), f"tools.jsonl:{t}") for t in range(1, 7)]
    plain = build_dataset(records, mistral, 4096)
    packed = build_dataset(records, mistral, 4096, pack=True)
    assert plain.summary.examples == packed.summary.examples == 12 and len(packed) < len(plain)
    assert sorted(packed.rows[0]["seq_lens"] + [n for row in packed.rows[1:] for n in row["seq_lens"]]) == sorted(
        len(row["input_ids"]) for row in plain)
    bundle = build_datasets(records, mistral, val_fraction=0.5, max_length=4096, pack=True)
    assert bundle.train.summary.examples == bundle.val.summary.examples == 6 and not bundle.val.summary.packed


@pytest.mark.parametrize("name", ["mistral", "deepseek-r1"])
def test_cli_trains_a_tool_chat_file(tmp_path, capsys, name):
    """``lorakit train --data`` on OpenAI tool records (Mistral: with OpenAI's long call ids; R1: reasoning before each
    call and answer) with a held-out share scored by exact match: the run completes, both turns of every chat are
    learnt (one example each), packed, and the notes say why and what changed."""
    from conftest import tiny_llama

    tok = family(name)
    folder = tmp_path / "model"
    tiny_llama(vocab_size=len(tok), max_position_embeddings=512, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    records = []
    for t in range(5):
        if name == "mistral":
            record = weather_chat(final=f"It is {t} degrees.")
            call = record["messages"][2]["tool_calls"][0]
            call["id"] = record["messages"][3]["tool_call_id"] = f"call_{t}bc123xyz"
        else:
            record = without_tools(name, "<think>\nUse the tool.\n</think>\n\n",
                                   final=f"<think>\nIt said {t}.\n</think>\n\nIt is {t} degrees.")
        records.append(json.dumps(record) + "\n")
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(records), encoding="utf-8")
    code = main(["train", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps",
                 "1", "--eval-examples", "1", "--val-fraction", "0.2", "--rank", "2", "--batch-size", "1",
                 "--no-progress", "--pack", "--max-length", "512"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "training data: 8 examples (from 4 records: 4 messages), 0 dropped" in out, out
    assert "trained as one example per assistant turn" in out, out
    assert ("the tool call ids of 4 chats were cut to the 9 characters" in out) == (name == "mistral"), out
    assert "held-out exact match" in out and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_openai_call_ids_and_calls_without_type():
    """OpenAI's ids (``call_`` + 24 characters) are refused by Mistral's template, which wants 9: they take their
    last 9 characters, as vLLM does for Mistral models, the tool result its call's; missing ids are numbered. A call
    without "type" gets "function", which DeepSeek's template writes."""
    tok = family("mistral")
    record = weather_chat()
    record["messages"][2]["tool_calls"][0]["id"] = record["messages"][3]["tool_call_id"] = "call_Ab3dE5fG7hI9"
    examples = tokenize_examples(record, tok, 4096)
    assert targets(examples[0], tok) == [EXPECTED["mistral"][0].replace("call12345", "dE5fG7hI9")]
    assert '{"content": {"temp": 21}, "call_id": "dE5fG7hI9"}[/TOOL_RESULTS]' in context(examples[1], tok)
    note = build_dataset([record, weather_chat()], tok, 4096).summary.drop_note()  # said, since the file's ids differ
    assert note.endswith("the tool call ids of 1 chat were cut to the 9 characters this model's chat template requires "
                         "(their last 9, as vLLM does for Mistral models)")
    del record["messages"][2]["tool_calls"][0]["id"], record["messages"][3]["tool_call_id"]
    examples = tokenize_examples(record, tok, 4096)
    assert targets(examples[0], tok) == [EXPECTED["mistral"][0].replace("call12345", "000000001")]
    assert '"call_id": "000000001"}' in context(examples[1], tok)

    untyped = without_tools("deepseek-v3.1")
    del untyped["messages"][2]["tool_calls"][0]["type"]
    assert all_targets(tokenize_examples(untyped, family("deepseek-v3.1"), 4096), family("deepseek-v3.1")) == \
        EXPECTED["deepseek-v3.1"]


def _call(call_id: str, city: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


def _longer_chats(name: str) -> dict[str, dict]:
    """A second question with its own call; two calls in a row; two calls in one turn (not Llama 3.1's)."""
    rounds = without_tools(name)
    rounds["messages"] += [{"role": "user", "content": "And Berlin?"},
                           {"role": "assistant", "content": None, "tool_calls": [_call("call67890", "Berlin")]},
                           {"role": "tool", "tool_call_id": "call67890", "content": '{"temp": 18}'},
                           {"role": "assistant", "content": "It is 18 degrees."}]
    chained = without_tools(name)
    chained["messages"][4:4] = [{"role": "assistant", "content": None, "tool_calls": [_call("call67890", "Berlin")]},
                                {"role": "tool", "tool_call_id": "call67890", "content": '{"temp": 18}'}]
    chats = {"rounds": rounds, "chained": chained}
    if name != "llama3.1":
        parallel = without_tools(name)
        parallel["messages"][2]["tool_calls"].append(_call("call67890", "Berlin"))
        parallel["messages"].insert(4, {"role": "tool", "tool_call_id": "call67890", "content": '{"temp": 18}'})
        chats["parallel"] = parallel
    return chats


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5", "qwen3", "mistral", "hermes", "deepseek-v3.1"])
def test_every_target_follows_its_inference_prompt(name):
    """Longer tool chats: every assistant turn is learnt once, and the text before each target is exactly the prompt
    the template renders to generate that turn (with the tools; DeepSeek's with its JSON-text arguments)."""
    tok = family(name)
    for chat_name, chat in _longer_chats(name).items():
        record = validate_record(chat, f"{name}/{chat_name}")
        turns = [i for i, m in enumerate(record["messages"]) if m["role"] == "assistant"]
        starts = [(example, k) for example in tokenize_examples(record, tok, 8192) for k in range(1, len(example["labels"]))
                  if example["labels"][k] != -100 and example["labels"][k - 1] == -100]
        assert len(starts) == len(turns), chat_name
        for (example, k), i in zip(starts, turns):
            messages = record["messages"][:i]
            if name.startswith("deepseek"):  # its template concatenates the arguments as text
                messages = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
                    c["function"]["arguments"])}} for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
            prompt = tok.apply_chat_template(messages, tools=record.fields.get("tools"), tokenize=False,
                                             add_generation_prompt=True)
            bos = tok.bos_token if tok.bos_token and not prompt.startswith(tok.bos_token) else ""
            assert tok.decode(example["input_ids"][:k]) == bos + prompt, (chat_name, i)


def test_deepseek_r1_writes_a_second_call_turn_without_its_header():
    """R1's template never resets its "first call" flag, so a second call turn is written without
    ``<｜Assistant｜><｜tool▁calls▁begin｜>``: no prompt is followed by it, and the record is refused, not mis-trained."""
    chat = without_tools("deepseek-r1")
    chat["messages"][4:4] = [{"role": "assistant", "content": "<think>\nBerlin too.\n</think>\n\n",
                              "tool_calls": [_call("call67890", "Berlin")]},
                             {"role": "tool", "tool_call_id": "call67890", "content": '{"temp": 18}'}]
    chat["messages"][2]["content"] = "<think>\nParis first.\n</think>\n\n"
    with pytest.raises(LorakitError) as info:
        tokenize_examples(validate_record(chat, "r1.jsonl:9"), family("deepseek-r1"), 4096)
    assert one_line(info).startswith("r1.jsonl:9: the chat template does not write messages[4] after the generation "
                                     "prompt it renders for messages[:4]")


def test_bare_function_schemas_are_wrapped_as_openai_tools():
    """glaive / xlam-style datasets list tools as bare function schemas: they reach the template as OpenAI's
    ``{"type": "function", "function": ...}`` (Mistral's template reads ``tool.function``; Qwen's writes the schema)."""
    bare = {**weather_chat(), "tools": [TOOLS[0]["function"]]}
    for name in ("mistral", "qwen2.5"):
        assert tokenize_examples(bare, family(name), 4096) == tokenize_examples(weather_chat(), family(name), 4096)


def test_the_evaluation_prompt_is_the_trained_context():
    """The prompt generation is scored from is the context the last answer was trained after: with the tools, and
    with an earlier call in the form the template reads (DeepSeek's JSON-text arguments, which failed as a dict)."""
    for name in ("llama3.1", "mistral", "deepseek-v3.1"):
        tok = family(name)
        record = validate_record(without_tools(name), "tools.jsonl:1")
        last = tokenize_examples(record, tok, 4096)[-1]
        start = max(k for k in range(1, len(last["labels"])) if last["labels"][k] != -100 and last["labels"][k - 1] == -100)
        assert generation_prompt(record, tok) == last["input_ids"][:start]
    text = family("llama3.1").decode(generation_prompt(validate_record(weather_chat()), family("llama3.1")))
    assert "Weather of a city" in text  # Llama 3.1 writes a tool result as a JSON string (tojson), as its template does
    assert text.endswith('ipython<|end_header_id|>\n\n"{\\"temp\\": 21}"<|eot_id|><|start_header_id|>assistant'
                         '<|end_header_id|>\n\n')


def test_mistral_chats_with_a_system_prompt_train_without_tools():
    """Not only tool chats: Mistral v0.3 writes the system prompt into the last user turn only, so any multi-turn chat
    with a system prompt was refused ("cannot be located"). Each answer now follows its own inference prompt."""
    tok = family("mistral")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"},
                {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    first, second = tokenize_examples({"messages": messages}, tok, 1024)
    assert [targets(first, tok), targets(second, tok)] == [[" I am fine.</s>"], [" Paris.</s>"]]
    assert context(first, tok) == "<s>[INST] Be brief.\n\nHello, how are you?[/INST]"
    assert context(second, tok) == "<s>[INST] Hello, how are you?[/INST] I am fine.</s>[INST] Be brief.\n\nCapital of France?[/INST]"


def test_the_reference_of_a_chat_that_ends_with_a_call():
    """Held-out exact match compared a chat that ends with a call against its empty content (an empty generation
    "matched"); the reference is now the call, as OpenAI JSON after any text."""
    from lorakit.train.data import reference_text

    record = weather_chat()
    record["messages"] = record["messages"][:3]
    assert reference_text(record) == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    record["messages"][2]["content"] = "Let me check."
    assert reference_text(record) == 'Let me check.\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert reference_text(weather_chat()) == "It is 21 degrees."


def test_the_error_names_what_the_data_lacks_not_what_a_variant_tripped_on():
    """Mistral refuses OpenAI's long ids before anything else; once the ids fit, the template drops the answer written
    beside a call: that is the error reported, since fixing the ids alone would not help."""
    record = weather_chat()
    record["messages"][2]["tool_calls"][0]["id"] = record["messages"][3]["tool_call_id"] = "call_Ab3dE5fG7hI9"
    record["messages"][2]["content"] = "Checking."
    with pytest.raises(LorakitError) as info:
        tokenize_examples(validate_record(record, "m.jsonl:2"), family("mistral"), 4096)
    assert one_line(info).startswith("m.jsonl:2: messages[2] has text beside its tool calls, but this model's chat "
                                     "template writes only the calls, so 'Checking.' would not be learnt")


MALFORMED = [  # what exports get wrong, each on top of weather_chat()
    lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='[1, 2]'),
    lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments={"q": "a\"b\n", "n": 3, "d": {"a": [1]}}),
    lambda r: r["messages"][2]["tool_calls"][0].update(type=None, id=12345),
    lambda r: r.update(tools=[{"type": "function"}]),
    lambda r: r["messages"].insert(3, {"role": "tool", "content": "an extra result"}),
    lambda r: r["messages"].__setitem__(3, {"role": "tool", "content": {"temp": 21}}),
    lambda r: r["messages"].pop(1),
    lambda r: r["messages"][2].update(content="<think>\nx\n</think>\n\n", reasoning_content=None),
    lambda r: r["messages"][4].update(tool_calls=[{"function": {"name": "get_weather", "arguments": "{}"}}]),
    lambda r: r["messages"][2].update(tool_calls=[{"function": {"name": "other_tool", "arguments": "{}"}}]),
]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_malformed_tool_chats_train_or_fail_in_one_line(name):
    """No template family turns a malformed tool chat into a traceback: it trains, or one LorakitError line names
    the record."""
    tok = family(name)
    for k, mutate in enumerate(MALFORMED):
        record = without_tools(name)
        mutate(record)
        try:
            examples = tokenize_examples(validate_record(record, f"bad.jsonl:{k}"), tok, 4096)
        except LorakitError as error:
            assert "\n" not in str(error) and str(error).startswith(f"bad.jsonl:{k}"), str(error)
        else:
            assert examples and all(any(lab != -100 for lab in ex["labels"]) for ex in examples)


def test_null_content_renders_with_the_same_variables_as_apply_chat_template():
    """The null-content variant renders through transformers' own function, with the tokenizer's special tokens, the
    tools and the template options as ``apply_chat_template`` passes them: where a template reads null and absent
    content alike (Llama 3.1, which also writes bos_token and the tools), the text is the same."""
    from lorakit.train.data import _render_chat

    tok = family("llama3.1")
    messages = validate_record(weather_chat())["messages"]
    null = [dict(m, content=None) if m.get("tool_calls") else m for m in messages]
    for prompt in (False, True):
        kept = _render_chat(tok, null, prompt, "x", TOOLS, {"date_string": "1 Jan 2025"})
        assert kept == tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=prompt,
                                               date_string="1 Jan 2025")
        assert kept.startswith("<|begin_of_text|>") and "Today Date: 1 Jan 2025" in kept and "Weather of a city" in kept


def test_llama_builtin_tools_end_the_call_with_eom():
    """Llama 3.1 with ``builtin_tools`` (a template option) ends a call turn with ``<|eom_id|>``, where the model
    stops for the ipython result: that ends the target, and no ``<|eot_id|>`` is put after it (the tokens are the
    template's own). A builtin tool's call is written in its python form."""
    tok = family("llama3.1")
    options = {"builtin_tools": ["brave_search", "wolfram_alpha"]}
    record = validate_record({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "brave_search", "arguments": {"query": "Paris weather"}}}]},
        {"role": "tool", "content": "21 degrees"}, {"role": "assistant", "content": "It is 21 degrees."}]})
    (example,) = tokenize_examples(record, tok, 4096, chat_template_kwargs=options)
    assert targets(example, tok) == ['<|python_tag|>brave_search.call(query="Paris weather")<|eom_id|>',
                                     "It is 21 degrees.<|eot_id|>"]
    assert example["input_ids"] == tok(tok.apply_chat_template(record["messages"], tokenize=False, **options),
                                       add_special_tokens=False)["input_ids"]
    assert "Tools: brave_search, wolfram_alpha" in context(example, tok)
    (custom,) = tokenize_examples(weather_chat(), tok, 4096, chat_template_kwargs=options)
    assert all_targets([custom], tok)[0].endswith('"parameters": {"city": "Paris"}}<|eom_id|>')


def test_llama_ipython_role_is_a_tool_turn():
    """Llama 3.1's own name for a tool result ("ipython") trains as role "tool" (the template writes both the same)."""
    tok = family("llama3.1")
    record = weather_chat()
    tool_turn = next(m for m in record["messages"] if m["role"] == "tool")
    expected = tokenize_examples(record, tok, 4096)
    tool_turn["role"] = "ipython"
    assert tokenize_examples(record, tok, 4096) == expected


def test_evaluation_generations_stop_at_the_call_end_token(monkeypatch):
    """Exact-match generation stops where a Llama 3.1 call turn ends (``<|eom_id|>``), as at end of turn."""
    import torch

    from conftest import tiny_llama
    from lorakit.train.evaluate import generate_records

    tok = family("llama3.1")
    eom = tok.convert_tokens_to_ids("<|eom_id|>")
    model = tiny_llama(vocab_size=len(tok))
    seen = []

    def generate(input_ids, attention_mask, generation_config, **_):
        seen.append(list(generation_config.eos_token_id))
        call = tok('{"name": "get_weather"}', add_special_tokens=False)["input_ids"]
        tail = torch.tensor([call + [eom] + call] * input_ids.shape[0])  # what follows the stop is not the answer
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    record = validate_record({"messages": [{"role": "user", "content": "Weather in Paris?"},
                                           {"role": "assistant", "content": "ok"}]})
    (generation,) = generate_records(model, tok, [record], max_new_tokens=32)
    assert eom in seen[0] and generation.stopped and generation.text == '{"name": "get_weather"}'
