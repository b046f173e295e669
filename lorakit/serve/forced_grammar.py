"""The rest of a forced tool call as a grammar: tool_choice "required" or a named function, held to the tools.

The server starts a forced call in the prompt (``tool_calls.forced_prefix``: up to the function's name, or up to
its arguments) and the model writes the rest. Left free, a model that does not call well wrote a name that is no
tool, arguments that are no JSON object, or prose, and the request failed with a 500 ("the model did not write a
call"), though the server can hold the answer to a grammar (llguidance, ``structured.py``), as vLLM holds
``tool_choice`` "required" and a named function to the tools' schemas. So, where llguidance is installed, the rest of
the call is a Lark grammar (:func:`forced_call_grammar`): one of the callable names (for "required"), the format's
text up to the arguments, the arguments as the tool's ``parameters`` schema (an object; any object without one),
written as templates write JSON (``", "`` and ``": "`` between items: Python's ``json.dumps``, Jinja's ``tojson``),
then the call's end as the template writes it (hermes' ``\\n</tool_call>`` may follow, as the model chooses; then
only an end token). One call: OpenAI's "required" asks for at least one.

Mistral v11's ``[CALL_ID]`` format (the model writes an id between name and arguments) is left unconstrained,
and so is every forced call under ``lorakit serve --tool-call-grammar off``: llguidance reads every token
added to a tokenizer as an opaque marker, never as its text, so a tokenizer whose added tokens are pieces of
calls (the scripted test models' words) would have them forbidden inside a call.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from lorakit.serve.tool_calls import ARGS_MARK, CALL_CLOSE

# JSON as templates write it: one space after ',' and ':', none elsewhere (llguidance's compact form otherwise)
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# per format: the text between a function's name and its arguments (after the prefix of "required"), and what
# closes the call after the arguments' object
_BETWEEN = {"hermes": '", "arguments": ', "llama3_json": '", "parameters": ', "mistral": '", "arguments": ',
            "mistral_args": ARGS_MARK}


def forced_call_grammar(fmt: str, tools: list[dict], name: str, names: set[str],
                        literal: Callable[[str], str]) -> str | None:
    """Lark text (llguidance's dialect) for what follows ``tool_calls.forced_prefix(fmt, name)``, or None for a
    format not constrained (``mistral_call_id``) or no tool to call.

    ``tools``: OpenAI's ``[{"type": "function", "function": {"name", "parameters"}}]``; ``name``: the function
    tool_choice names ("" for "required"); ``names``: those a call may name ("required": all, or allowed_tools');
    ``literal(text)``: the Lark term for a marker's text (``<[id]>`` where the tokenizer writes it as one added
    token, which llguidance cannot match as text; else a string)."""
    if fmt not in _BETWEEN:
        return None
    schemas = {tool["function"]["name"]: tool["function"].get("parameters") for tool in tools}
    wanted = [name] if name else sorted(n for n in names if n in schemas)
    if not wanted or any(n not in schemas for n in wanted):
        return None
    rules, options = [], []
    for i, function in enumerate(wanted):
        rules.append(f"args{i}: %json " + json.dumps(_object_schema(schemas[function])))
        head = "" if name else (literal(ARGS_MARK) if fmt == "mistral_args" else json.dumps(_BETWEEN[fmt])) + " "
        options.append(((json.dumps(function) + " ") if not name else "") + head + f"args{i}")
    tail = {"hermes": ' "}" ("\\n" ' + literal(CALL_CLOSE) + ")?", "llama3_json": ' "}"', "mistral": ' "}]"',
            "mistral_args": ""}[fmt]
    return "start: (" + " | ".join(options) + ")" + tail + "\n" + "\n".join(rules)


def _object_schema(parameters: Any) -> dict:
    """A tool's ``parameters`` as the arguments' schema: an object (any object when none is given), written in
    :data:`JSON_STYLE` unless the schema's own ``x-guidance`` says otherwise."""
    from lorakit.serve.structured import known_formats_only  # (imports llguidance only when a format is met)

    schema = known_formats_only(dict(parameters)) if isinstance(parameters, dict) else {}
    if not schema or "type" not in schema:
        schema.setdefault("type", "object")
    schema["x-guidance"] = {**JSON_STYLE, **(schema.get("x-guidance") or {})}
    return schema


def marker_literal(tokenizer: Any, text: str) -> str:
    """The Lark term for ``text``: ``<[id]>`` when the tokenizer holds it as one added token (Qwen's
    ``</tool_call>``, Mistral's ``[ARGS]``), else the string itself."""
    token = tokenizer.get_added_vocab().get(text) if hasattr(tokenizer, "get_added_vocab") else None
    return f"<[{int(token)}]>" if token is not None else json.dumps(text)
