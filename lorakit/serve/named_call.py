"""A named ``tool_choice`` on a chat template that writes no tool calls (smollm2's ChatML), served as vLLM serves
one on any model: the answer is held to the function's ``parameters`` JSON schema (the structured-output path of
``response_format`` json_schema, ``structured.py``) and returned as that function's one call, its arguments the
JSON the model wrote; ``finish_reason`` stays "stop" ("length" when cut), content "" (vLLM's message).

Nothing is added to the prompt: the template does not write the tools, and vLLM renders none either. Templates
with a tool-call format keep their own forced call (``tool_calls.forced_prefix``); "required" on a template
without one stays a 400 (the answer could not say which function it calls).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit.serve.tool_calls import _new_id, call_format

# OpenAI's reading of a function sent without parameters: it takes none (an empty object, and no other: a bare
# {"type": "object"} would let the model write any keys)
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class SchemaCall:
    """The function a named tool_choice calls where the template has no call format: ``name`` and ``schema`` (its
    ``parameters``, the answer's JSON schema)."""

    name: str
    schema: dict

    def spec(self) -> tuple[str, dict, str, None]:
        """The format as ``_constraints`` takes it (``(kind, schema, name, whitespace)``, as response_format's)."""
        return "json_schema", self.schema, self.name, None

    def call(self, arguments: str, ident: str | None = None) -> dict:
        """OpenAI's ``tool_calls`` entry for ``arguments`` (the answer's text), with a new id unless ``ident``."""
        return {"id": ident or _new_id(), "type": "function", "function": {"name": self.name, "arguments": arguments}}

    def message(self, message: dict) -> dict:
        """A non-streamed chat message (role, content = the answer's JSON, maybe reasoning_content) as the call:
        its content moves to the call's arguments and becomes ""."""
        return {**message, "content": "", "tool_calls": [self.call(message.get("content") or "")]}


def schema_call(tokenizer: Any, body, tools: list[dict] | None) -> SchemaCall | None:
    """The :class:`SchemaCall` of chat request ``body`` (``tools``: its OpenAI tools) on a template
    (``tokenizer``'s) that writes no tool-call format, when its tool_choice names a function; else None (no tools,
    tool_choice not a named function, or a template whose calls are parsed)."""
    name = body.forced_call()
    if not name or not tools or call_format(tokenizer, tools) is not None:
        return None
    function = next(tool["function"] for tool in tools if tool["function"]["name"] == name)  # checked on parse
    return SchemaCall(name, function.get("parameters") or NO_PARAMETERS)


@dataclass
class ArgumentStream:
    """One streamed choice's call (:class:`SchemaCall`): its head (index, id, type, name, empty arguments) first,
    then each piece of answer text as an arguments delta, as vLLM streams a named call; joined, the deltas are the
    non-streamed call."""

    named: SchemaCall
    ident: str = field(default_factory=_new_id)
    started: bool = False

    def deltas(self, piece: str) -> list[dict]:
        """``delta.tool_calls`` entries for the newly final ``piece`` (the head first, once; "" sends the head
        alone when not yet sent, so a choice that wrote nothing still names its call)."""
        out = []
        if not self.started:
            self.started = True
            out.append({"index": 0, **self.named.call("", self.ident)})
        if piece:
            out.append({"index": 0, "function": {"arguments": piece}})
        return out
