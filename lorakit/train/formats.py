"""Training records: the shapes read, their validation, and the other tools' formats read as them (files: sources.py).

A record has exactly one of three shapes (the fields are strict: anything else is a mistake we report):

- ``{"text": str}``: plain text, every token is a target (continued pre-training style).
- ``{"prompt": str, "completion": str}``: only the completion (plus the end-of-turn token) is a target.
- ``{"messages": [{"role": ..., "content": str}, ...]}``: a chat, rendered through the tokenizer's chat
  template; only assistant turns (each with its end-of-turn token) are targets. The chat needs an assistant
  turn; turns after the last one are trimmed, since nothing follows them to learn.
  A message's content may also be a list of text parts (``[{"type": "text", "text": ...}]``, as OpenAI and
  multimodal datasets write it; the parts are joined), and an assistant message may carry OpenAI's ``"weight": 0``
  to leave that turn unsupervised (a weight 0 on other turns, which SlimOrca writes on every human turn, is accepted:
  they are never trained); Axolotl's per-turn ``"training": false`` / ``true`` reads as weight 0 / 1. Keys whose value is null (``"tool_calls": null``) are ignored. OpenAI tool use
  (``tools`` beside ``messages``; ``tool_calls`` on assistant turns, ``tool_call_id`` / ``name`` on tool turns) is
  handed to the chat template, and a template that does not write the calls is reported (the call would be lost).
  So is an assistant turn's ``reasoning_content`` (or ``thinking`` / ``reasoning``), as reasoning-distillation
  datasets write it: trained where the template writes it (Qwen3), reported where it would be dropped.

The formats of other tools are read as chats (see :func:`_convert_other_formats`):

- Alpaca ``{"instruction", "input" (optional), "output", "system" (optional)}``: one user turn (the instruction,
  a blank line, the input) and the output as the assistant turn (tatsu-lab/alpaca's "text" column, the same
  example rendered, is ignored). A tokenizer without a chat template trains it in Alpaca's own prompt format
  ("### Instruction: ... ### Response:") instead (``Record.fallback``).
- ShareGPT ``{"conversations": [{"from": "human" | "gpt" | "system" | ..., "value": str}], "system" (optional)}`` (also
  under ``"messages"``, and role/content turns under ``"conversations"``, as many Hub datasets mix them); with
  LLaMA-Factory's ``"tools"`` (function schemas), its ``function_call`` turns are tool calls and ``observation``
  turns their results.
- Gemini / Vertex AI ``{"systemInstruction" (optional), "contents": [{"role": "user" | "model", "parts": [{"text"}]}]}``.
- Anthropic's Messages format (Amazon Bedrock's Claude fine-tuning files) ``{"system", "messages"}``: the system
  prompt becomes the first turn. LLaMA-Factory's Alpaca ``"history": [[instruction, response], ...]``: the turns
  before the record's own, every answer trained.
- Dolly ``{"instruction", "context" (optional), "response"}``, read as Alpaca; question/answer pairs (GSM8K's
  ``{"question", "answer"}``, optionally ``"context"`` before the question; OpenOrca's ``{"system_prompt",
  "question", "response"}``) as one user and one assistant turn (without a chat template: "Question: ...\nAnswer: ").

What a user's file may differ in and is still read the same: field names in another case or with spaces
(``"Prompt"``, ``" completion"`` from a CSV header; roles ``"User"``), OpenAI's legacy function calling
(``functions``, ``function_call``, role ``function``: read as ``tools`` / ``tool_calls`` / ``tool``), other tools'
role names in role/content chats (:data:`ROLE_ALIASES`: ShareGPT's ``human`` / ``gpt``, Gemini's and Gemma's
``model``, Cohere's ``chatbot``, OpenAI's ``developer`` for the system turn), Responses API parts (``input_text`` /
``output_text``) and OpenAI's assistant ``refusal`` parts, a tool turn whose content is a JSON object (written as JSON text), trailing user or tool turns after the last assistant turn
(trimmed: nothing follows them to learn, and a causal model's loss on the earlier turns does not depend on them;
the summary counts the chats trimmed), a ``prompt`` column beside ``messages`` that repeats the chat's first user
turn (UltraChat 200k, No Robots: ignored), a ``.json`` file that wraps its records in one object (``{"data": [...]}``;
``{"train": [...], "test": [...]}`` gives the split asked for),
pretty-printed JSON objects one after another in a ``.jsonl`` file (``jq .`` output), a chat given as its bare
list of turns (a JSONL line ``[{"role": ...}, ...]``), a ``;``-separated CSV, and a folder of ``train*`` /
``validation*`` / ``test*`` files (the split asked for is read, see :func:`lorakit.train.sources._split_files`).

Preference (DPO) records ``{"prompt", "chosen", "rejected"}`` (OpenAI's: ``{"input", "preferred_output",
"non_preferred_output"}``) and KTO records ``{"prompt", "completion", "label": true/false}`` are refused: lorakit
trains supervised fine-tuning, and training on ``chosen`` alone (or on the completions labelled true) is a choice
the user makes by renaming (or filtering) them.

Every record carries ``where`` ("orders.jsonl:12", "data.csv:4", "folder[train] row 7") so that any later
error (a template failure, an example too long) names the place the user has to fix. Every mistake raises
:class:`lorakit.errors.LorakitError` with one line.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from lorakit.config import clipped, shown
from lorakit.errors import LorakitError

SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}
ROLES = ("system", "user", "assistant", "tool")
# other names of the four roles in role/content chats, as their tools write them (matched case-insensitively)
ROLE_ALIASES = {
    "human": "user", "gpt": "assistant",  # ShareGPT's speaker names, in files converted to role/content keys only
    "model": "assistant",  # Gemini's and Gemma's (its chat template's turn is <start_of_turn>model)
    "chatbot": "assistant",  # Cohere's fine-tuning files (System / User / Chatbot)
    "developer": "system",  # OpenAI's name for the system turn since o1
    "function": "tool",  # OpenAI's legacy function result
    "ipython": "tool",  # Llama 3.1's tool result
}
MESSAGE_KEYS = ("role", "content")
# OpenAI tool use, handed to the chat template as they are (templates with tool support render them)
TOOL_MESSAGE_KEYS = ("name", "tool_calls", "tool_call_id")
# an assistant turn's reasoning, as distilled-reasoning datasets write it: handed to the chat template under the
# key given (Qwen3's template reads reasoning_content, gpt-oss's thinking); a template that drops it is reported
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# optional record-level keys of a chat: the tool schemas given to the template; OpenAI's API flag (ignored)
CHAT_OPTIONAL_FIELDS = ("tools", "parallel_tool_calls")
# bookkeeping columns of public dataset exports (UltraChat's prompt_id, OpenHermes' source, Dolly's category,
# FineTome's quality score, Open-Platypus' data_source, ...):
# they say nothing about the text to train on, so a record may carry them; any other unknown field is refused,
# since it is usually a misnamed one (an "answer" meant as the completion)
IGNORED_FIELDS = frozenset({"id", "idx", "index", "uuid", "prompt_id", "conversation_id", "source", "data_source",
                            "dataset", "score", "category", "metadata", "meta", "lang", "language", "license", "url",
                            "timestamp",
                            # the row index pandas writes: to_csv's unnamed first column, pyarrow's parquet column
                            "", "unnamed: 0", "__index_level_0__"})
EXPECTED_SHAPES = '{"text"}, {"prompt", "completion"} or {"messages": [...]}'
ALPACA_KEYS = ("instruction", "input", "output", "system")
HISTORY = "history"  # LLaMA-Factory's Alpaca records: the earlier [instruction, response] pairs of the chat
DOLLY_KEYS = ("instruction", "context", "response")  # databricks-dolly-15k (its "category" is a bookkeeping field)
QA_KEYS = ("question", "answer", "context", "system")  # GSM8K, SQuAD-like sets flattened to strings
# OpenOrca's {system_prompt, question, response}: the system turn and the answer under other names
SYSTEM_ALIAS, ANSWER_ALIAS = "system_prompt", "response"
QA_PROMPT = "{context}Question: {question}\nAnswer: "  # the prompt/completion form, for a tokenizer without a template
# and Alpaca's (ALPACA_PROMPT, below): by name, as results.json's prompt_format keeps them for lorakit generate
LEGACY_CHAT_FIELDS = ("functions",)  # OpenAI's function calling before tools: read as tools
PREFERENCE_KEYS = ("chosen", "rejected")
OPENAI_PREFERENCE_KEYS = ("preferred_output", "non_preferred_output")  # OpenAI's preference fine-tuning (DPO) files
GEMINI_KEYS = ("contents", "systeminstruction", "system_instruction")  # Vertex AI tuning files (keys lowercased)
GEMINI_ROLES = {"user": "user", "model": "assistant", "system": "system"}
# names other tools give the two halves of an example: a record with no known field is told which to rename
PROMPT_LIKE = ("input", "inputs", "query", "instruction", "question", "context", "source_text", "src", "human", "user")
COMPLETION_LIKE = ("output", "response", "answer", "target", "targets", "reply", "label_text", "tgt", "gpt",
                   "assistant")
MESSAGE_LIKE = ("conversation", "conversations", "dialog", "dialogue", "chat", "turns", "history")
SHAREGPT_KEYS = ("conversations", "system")
# LLaMA-Factory's ShareGPT tool-use records (glaive_toolcall, ...) carry the function schemas of their function_call
# turns in a "tools" field (a JSON string of a list of {"name", "description", "parameters"})
SHAREGPT_TOOLS = "tools"
# ShareGPT speaker names (from FastChat, Axolotl and LLaMA-Factory exports) -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "tool": "tool", "function": "tool", "observation": "tool", "function_response": "tool",
                  "function_call": "assistant"}  # LLaMA-Factory: the call (a tool call with "tools", else text)
# the DatasetDict split --val-data reads, the first present (--data reads "train")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"  # Alpaca's template, without its preamble
PROMPT_FRAMES = {"alpaca": "Alpaca's prompt format", "question": "the question/answer prompt format"}


def frame_prompt(kind: str, prompt: str, system: str | None = None) -> str:
    """``prompt`` framed as the no-template fallback framed the training prompts of ``kind`` (a key of
    :data:`PROMPT_FRAMES`): the instruction of an Alpaca prompt, the question of a question/answer one, ``system``
    (if any) before it as the fallback writes it."""
    if kind == "alpaca":
        framed = ALPACA_PROMPT.format(instruction=prompt, input="")
    elif kind == "question":
        framed = QA_PROMPT.format(question=prompt, context="")
    else:
        raise ValueError(f"unknown prompt frame {kind!r}; known: {', '.join(PROMPT_FRAMES)}")
    return f"{system}\n\n{framed}" if system and system.strip() else framed


# each frame cut where a chat template writes it: (before the user's text, after it, the response cue). frame_prompt
# is their concatenation: before + prompt + after + cue
_FRAME_PARTS = {"alpaca": ("### Instruction:\n", "\n\n", "### Response:\n"), "question": ("Question: ", "\n", "Answer: ")}


# how frame_chat_template's templates begin (a Jinja comment), so that a tokenizer given one is known for it
# (frame_of_template): the records it trains or evaluates take the prompt format itself, as on the bare tokenizer
FRAME_TEMPLATE_MARK = "{#- lorakit: "
FRAME_TEMPLATE_NOTE = ", as the adapter was trained on a tokenizer without a chat template -#}"


def frame_of_template(template: Any) -> str | None:
    """The kind (a key of :data:`PROMPT_FRAMES`) of a chat template :func:`frame_chat_template` wrote, else None
    (another template, none, or transformers' dict of named templates)."""
    if not isinstance(template, str) or not template.startswith(FRAME_TEMPLATE_MARK):
        return None
    return next((kind for kind, name in PROMPT_FRAMES.items()
                 if template.startswith(f"{FRAME_TEMPLATE_MARK}{name}{FRAME_TEMPLATE_NOTE}")), None)


def _jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal: JSON's escapes (quotes, backslashes, control characters) are Python's,
    which Jinja's lexer decodes; non-ASCII is kept as itself (JSON's surrogate pairs would decode to two halves)."""
    return json.dumps(text, ensure_ascii=False)


def frame_chat_template(kind: str, system: str | None = None, bos: bool = False) -> str:
    """A Jinja chat template that renders a chat as the no-template fallback framed the training prompts of ``kind``
    (a key of :data:`PROMPT_FRAMES`), so that ``apply_chat_template(..., add_generation_prompt=True)`` of one user
    turn (and an optional system turn) is ``frame_prompt(kind, user, system)`` text, token for token with training's
    prompt ids (``bos``: the tokenizer puts BOS in front of text, as training then did: the template writes
    ``bos_token``).

    ``system``: the run's own system text, written when the chat has no system turn (every training prompt began with
    it, and ``lorakit generate`` asks with it likewise); a system turn replaces it (an empty one drops it). Later
    turns (never trained: each record was one exchange) continue the frame: each answer followed by ``eos_token``,
    as training ended it, then the next user turn framed. Other roles are refused (``raise_exception``)."""
    if kind not in _FRAME_PARTS:
        raise ValueError(f"unknown prompt frame {kind!r}; known: {', '.join(PROMPT_FRAMES)}")
    before, after, cue = map(_jinja_string, _FRAME_PARTS[kind])
    default = _jinja_string(system) if system and system.strip() else '""'
    return (
        f"{FRAME_TEMPLATE_MARK}{PROMPT_FRAMES[kind]}{FRAME_TEMPLATE_NOTE}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {default} -%}}{{%- set turns = messages -%}}{{%- endif -%}}"
        + ("{{- bos_token -}}" if bos else "")
        + "{%- if system is string and system.strip() -%}{{- system + '\\n\\n' -}}{%- endif -%}"
        "{%- for message in turns -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{- {before} + message['content'] + {after} -}}}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{- {cue} + message['content'] + eos_token -}}}}"
        "{%- else -%}{{- raise_exception('this model was trained on user and assistant turns only (and one system "
        "turn first); got a ' + message['role'] + ' turn') -}}{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {cue} -}}}}{{%- endif -%}}")


def with_frame_template(tokenizer: Any, kind: str, system: str | None = None) -> Any:
    """``tokenizer`` (changed in place, and returned) with :func:`frame_chat_template`'s template for ``kind`` and
    ``system``, BOS written where the tokenizer puts it in front of text (training's rule, ``train.data``)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    tokenizer.chat_template = frame_chat_template(kind, system, bos=bos_id is not None and bool(probe) and
                                                  probe[0] == bos_id)
    return tokenizer
# every top-level field a record may have, in lowercase: a key that matches one of these once lowercased and stripped
# ("Prompt", " completion") is read as it
KNOWN_FIELDS = frozenset({"text", "prompt", "completion", "messages", *CHAT_OPTIONAL_FIELDS, *LEGACY_CHAT_FIELDS,
                          *ALPACA_KEYS, *DOLLY_KEYS, *QA_KEYS, *SHAREGPT_KEYS, *PREFERENCE_KEYS, *OPENAI_PREFERENCE_KEYS,
                          *GEMINI_KEYS, SYSTEM_ALIAS, HISTORY, *IGNORED_FIELDS})
KNOWN_MESSAGE_KEYS = frozenset({*MESSAGE_KEYS, *TOOL_MESSAGE_KEYS, *REASONING_KEYS, "weight", "training",
                                "function_call", "from", "value"})


@dataclass(frozen=True)
class Record:
    """One validated training example.

    Attributes:
        shape: "text", "prompt_completion" or "messages".
        fields: the record's fields, validated (strings are str; messages are dicts with role and content; a
            chat may also hold ``"unsupervised"``: indices of assistant turns given ``"weight": 0``).
        where: where it came from, for error messages ("train.jsonl:12").
        fallback: the same example as a prompt/completion record, used with a tokenizer that has no chat
            template (Alpaca records: Alpaca's prompt format); None for records that need the template.
        frame: on such a fallback, how its prompt was framed, so that ``lorakit generate`` frames a prompt the same
            way: (kind, system, ask), kind a key of :data:`PROMPT_FRAMES`, system the system text before the frame
            ("" for none), ask the instruction or question alone when the record had no input / context, else None
            (the prompt a user would type). None for every other record.
        turns_as: on a chat converted from a record whose turns are not its ``messages`` one for one (ShareGPT's
            ``conversations``, a ``system`` field put before them): (the record's key for its turns, how many turns
            lorakit put first), so that an error found later, when the chat is tokenized, names the turn as the
            record has it (:func:`turns_as_given`). None when ``messages[i]`` is the record's own name.
    """

    shape: str
    fields: Mapping[str, Any]
    where: str = "<record>"
    fallback: "Record | None" = None
    frame: "tuple[str, str, str | None] | None" = None
    turns_as: "tuple[str, int] | None" = None

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def validate_record(obj: Any, where: str = "<record>") -> Record:
    """Check one raw record (a dict from JSON, CSV or datasets) and return it as a :class:`Record`.

    Fields whose value is null (None, or NaN in a pandas DataFrame's rows) or, once the record as given fails, empty
    count as absent when the record reads without them, as in a table (Parquet, datasets): a table written as JSON
    lines or CSV by pandas has null (or an empty cell) where another record shape's column is, and exports carry null
    metadata (OpenHermes' topic, views...). An empty field the record needs gets its own error ("empty completion",
    "field 'completion' is null"); else the error is the one for the record as given.

    Raises:
        LorakitError: not an object, no known field, an unknown or missing field, a field of the wrong type,
            an empty text or completion, a bad message, or a chat that does not end with an assistant turn.
    """
    if isinstance(obj, Record):
        return obj
    if isinstance(obj, Mapping) and any(_null(value) for value in obj.values()):  # a null unknown field holds nothing
        obj = {key: value for key, value in obj.items() if not _null(value) or (
            isinstance(key, str) and key.strip().lower() in KNOWN_FIELDS)}
    try:
        return _validate(obj, where)
    except LorakitError as error:
        if not isinstance(obj, Mapping) or not any(_empty(value) for value in obj.values()):
            raise
        as_given = error
    present = {key: value for key, value in obj.items() if not _empty(value)}  # as a table row reads
    gave_back = False
    for _ in range(len(obj)):  # give back, one at a time, the empty fields the record turns out to need
        try:
            return _validate(present, where)
        except LorakitError as error:
            missing = getattr(error, "missing_field", None)
            key = next((k for k in obj if k not in present and isinstance(k, str) and k.strip().lower() == missing),
                       None)
            if key is None:  # a field given back fails on its own ("empty completion", "is null"): that is the fix
                raise (error if gave_back else as_given) from None
            present[key], gave_back = obj[key], True
    raise as_given


# the columns multimodal datasets keep their images, audio and video in, beside the chat (LLaVA's "image", TRL's and
# LLaMA-Factory's "images", ...): the text refers to them ("<image>"), so it cannot be learnt without them
MEDIA_FIELDS = frozenset({"image", "images", "audio", "audios", "video", "videos"})


def _without_media(obj: Mapping, where: str) -> Mapping:
    """The record without empty media columns (a text-only row of a mixed dataset: ``"images": []``); a row that has
    media is refused: lorakit trains text-only models, and training its text alone teaches answers about a picture
    the model never sees."""
    media = [key for key in obj if isinstance(key, str) and key.strip().lower() in MEDIA_FIELDS]
    if not media:
        return obj
    held = [key for key in media if obj[key] not in (None, "", [], {})]
    if held:
        raise LorakitError(f"{where}: a multimodal record (its {shown(held[0])} field holds media); lorakit trains text-only "
                           "language models, and the text alone would teach answers about media the model never sees; "
                           "give text-only records (drop the rows that have media)")
    return {key: value for key, value in obj.items() if key not in media}


def _null(value: Any) -> bool:
    """None, or NaN: pandas' null in the rows of a DataFrame (``to_dict("records")``)."""
    return value is None or (isinstance(value, float) and value != value)


def _empty(value: Any) -> bool:
    """A null, or an empty string: the cell a CSV export leaves for another record shape's column."""
    return _null(value) or value == ""


def _validate(obj: Any, where: str) -> Record:
    """:func:`validate_record` of the record as given."""
    if _turns_have(obj, "role"):  # a bare chat: its list of turns
        obj = {"messages": obj}
    elif _turns_have(obj, "from"):
        obj = {"conversations": obj}
    if not isinstance(obj, Mapping):
        twice = ""
        if isinstance(obj, str) and obj.lstrip().startswith("{"):
            with contextlib.suppress(ValueError, RecursionError):
                if isinstance(json.loads(obj), Mapping):
                    twice = " holding a JSON object: the record was encoded twice (json.dumps of json.dumps); encode it once"
        raise LorakitError(f"{where}: expected an object with {EXPECTED_SHAPES}, got {_json_type(obj)}{twice}")
    obj = _normalize_keys(obj, KNOWN_FIELDS)
    obj = _without_media(obj, where)
    if not IGNORED_FIELDS.isdisjoint(obj.keys()):
        obj = {key: value for key, value in obj.items() if key not in IGNORED_FIELDS}
    if "messages" in obj and isinstance(obj.get("prompt"), str) and "completion" not in obj:
        obj = _without_repeated_prompt(obj, where)
    if any(key in obj for key in PREFERENCE_KEYS):
        present = "/".join(k for k in ("prompt", "chosen", "rejected") if k in obj)
        raise LorakitError(
            f"{where}: a preference (DPO) record ({present}); lorakit trains supervised fine-tuning, not preference "
            "optimisation: to learn the preferred answers, rename 'chosen' to 'completion' (for chats: "
            "{\"messages\": prompt + chosen}) and delete 'rejected', or train DPO with TRL's DPOTrainer on an injected "
            "model (README: With TRL)")
    if any(key in obj for key in OPENAI_PREFERENCE_KEYS):
        raise LorakitError(
            f"{where}: a preference (DPO) record (OpenAI's input/preferred_output/non_preferred_output); lorakit trains "
            "supervised fine-tuning, not preference optimisation: to learn the preferred answers, write each as "
            "{\"messages\": input messages + preferred_output} and drop non_preferred_output, or train DPO with TRL's "
            "DPOTrainer on an injected model (README: With TRL)")
    label = obj.get("label")
    if "completion" in obj and (isinstance(label, bool) or label in (0, 1) and not isinstance(label, float)
                                or str(label).strip().lower() in ("true", "false", "0", "1")):
        # TRL's KTO format (trl-lib/kto-mix-14k); a CSV export writes the label as text, pandas / a spreadsheet as 0/1
        # not an unknown field to delete: without it the answers labelled bad would train as good ones
        raise LorakitError(
            f"{where}: a KTO (unpaired preference) record: 'label' says whether the completion is a good answer; "
            "lorakit trains supervised fine-tuning on every completion: to learn the good ones, keep the records with "
            "label true (or 1), then delete 'label', or train KTO with TRL's KTOTrainer on an injected model (README: With TRL)")
    converted = _convert_other_formats(obj, where)
    if converted is not None:
        return converted
    keys = list(obj.keys())
    if "instruction" in obj and not {"messages", "prompt", "completion", "text"} & set(obj):
        # an Alpaca record without its answer, often a typo ("ouput"); a record of another tool's names (instruction
        # and answer) gets the rename hint below instead
        renames = [(key, _renamed(key, ("output", "response"))) for key in keys if key not in KNOWN_FIELDS]
        fix = ", ".join(f"rename {shown(key)} to {shown(name)}" for key, name in renames if name)
        if fix or not _rename_hint(obj):
            raise LorakitError(f"{where}: an Alpaca record (with 'instruction') needs 'output' (or Dolly's "
                               f"'response'); it has {_keys(keys)}" + (f": {fix}" if fix else ""))
    if "messages" in obj:
        shape = "messages"
    elif "prompt" in obj or "completion" in obj:
        shape = "prompt_completion"
    elif "text" in obj:
        shape = "text"
    else:
        raise LorakitError(f"{where}: no known field in [{_keys(sorted(map(str, keys)))}]; a record is {EXPECTED_SHAPES}"
                           + _rename_hint(obj))
    allowed = SHAPE_FIELDS[shape]
    optional = (*CHAT_OPTIONAL_FIELDS, *LEGACY_CHAT_FIELDS) if shape == "messages" else ()
    _refuse_unknown(obj, (*allowed, *optional), f"a {shape} record", allowed, where)
    for key in allowed:
        if key not in obj:
            error = LorakitError(f"{where}: missing field {shown(key)}; a {shape} record needs {', '.join(map(repr, allowed))}")
            error.missing_field = key  # a table reader says when the cell is there but empty
            raise error
    if shape == "text":
        _check_string(obj["text"], "text", where, nonempty=True, what="empty text")
        return Record(shape, {"text": obj["text"]}, where)
    if shape == "prompt_completion":
        _check_string(obj["prompt"], "prompt", where, nonempty=False)
        _check_string(obj["completion"], "completion", where, nonempty=True, what="empty completion")
        return Record(shape, {"prompt": obj["prompt"], "completion": obj["completion"]}, where)
    messages, unsupervised, trimmed = _validate_messages(obj["messages"], where)
    fields: dict[str, Any] = {"messages": messages}
    if unsupervised:
        fields["unsupervised"] = unsupervised
    if trimmed:
        fields["trimmed_turns"] = trimmed
    tools = obj.get("tools")
    if obj.get("functions") is not None:  # OpenAI's legacy function schemas are tool schemas of type "function"
        if tools is not None:
            raise LorakitError(f"{where}: has both 'tools' and the legacy 'functions'; keep one")
        functions = _json_field(obj["functions"], f"{where}: field 'functions'")
        if not isinstance(functions, list) or not all(isinstance(f, Mapping) for f in functions):
            raise LorakitError(f"{where}: field 'functions' must be a list of function schemas ({{\"name\": ...}})")
        tools = [{"type": "function", "function": dict(f)} for f in functions]
    if tools is not None:
        fields["tools"] = _validate_tools(tools, where)
    return Record(shape, fields, where)


def _without_repeated_prompt(obj: Mapping, where: str) -> Mapping:
    """A chat record without its ``"prompt"`` column when that is the chat's first user turn again, as
    HuggingFaceH4's UltraChat 200k and No Robots ship it (``prompt``, ``prompt_id``, ``messages``); a prompt that is
    some other text is refused, since which of the two to train is the user's call."""
    turns = _json_or_none(obj["messages"])  # a CSV cell holds the chat as JSON text; a bad one is reported later
    first = next((turn for turn in turns if isinstance(turn, Mapping) and str(
        turn.get("role", turn.get("from", ""))).strip().lower() in ("user", "human")), None) \
        if isinstance(turns, list) else None
    content = first.get("content", first.get("value")) if first is not None else None
    if isinstance(content, str) and content.strip() == obj["prompt"].strip():
        return {key: value for key, value in obj.items() if key != "prompt"}
    shown = f"the chat's first user turn ({clipped(content, 40)!r})" if isinstance(content, str) else \
        "in the chat (it has no user turn with text)"
    raise LorakitError(f"{where}: field 'prompt' ({clipped(obj['prompt'], 40)!r}) is not {shown}, so which of "
                       "the two to train is unclear; give one of 'prompt' or 'messages'")


def _convert_gemini(obj: Mapping, where: str) -> Record:
    """A Gemini / Vertex AI tuning record (``{"systemInstruction": {"parts": [...]}, "contents": [{"role": "user" |
    "model", "parts": [{"text": ...}]}]}``) as a chat; parts other than text (function calls, inline data) are
    refused, since the chat template would not write them."""
    _refuse_unknown(obj, GEMINI_KEYS, "a Gemini record", ("contents", "systemInstruction"), where)
    contents = obj["contents"]
    if not isinstance(contents, list) or not contents:
        raise LorakitError(f"{where}: field 'contents' must be a non-empty list of {{role, parts}} objects (Gemini)")
    system = obj.get("systeminstruction", obj.get("system_instruction"))
    turns = [("systemInstruction", {**system, "role": "system"})] if isinstance(system, Mapping) else []
    turns += [(f"contents[{i}]", turn) for i, turn in enumerate(contents)]
    messages = []
    for at, turn in turns:
        at = f"{where}: {at}"
        parts = turn.get("parts") if isinstance(turn, Mapping) else None
        role = GEMINI_ROLES.get(str(turn.get("role", "user")).lower()) if isinstance(turn, Mapping) else None
        if role is None or not isinstance(parts, list):
            raise LorakitError(f"{at} must be an object with a role ('user' or 'model') and a list of parts (Gemini)")
        for j, part in enumerate(parts):
            if not isinstance(part, Mapping) or not isinstance(part.get("text"), str):
                kind = next(iter(part), "empty") if isinstance(part, Mapping) and part else _json_type(part)
                raise LorakitError(f"{at}.parts[{j}] is a {shown(kind)} part; lorakit reads the text parts of Gemini records")
        messages.append({"role": role, "content": "".join(part["text"] for part in parts)})
    return validate_record({"messages": messages}, where)


def _turns_have(turns: Any, key: str) -> bool:
    """Whether ``turns`` is a non-empty list of objects that all have ``key`` (in any case)."""
    return isinstance(turns, list) and bool(turns) and all(
        isinstance(t, Mapping) and any(isinstance(k, str) and k.strip().lower() == key for k in t) for t in turns)


def _refuse_unknown(obj: Mapping, allowed: Iterable[str], what: str, listed: Iterable[str], where: str) -> None:
    """Refuse a record with fields its format does not have, naming all of them at once (an export with several
    extra columns is fixed in one go, not one run per column)."""
    unknown = [key for key in obj if key not in allowed]
    same = next((key for key in unknown if isinstance(key, str) and key.strip().lower() != key
                 and key.strip().lower() in obj), None)
    if same is not None:  # "Completion" beside "completion": one field twice, as a key given twice is
        raise LorakitError(f"{where}: {shown(same)} and {shown(same.strip().lower())} are one field (names are read in any case, "
                           "spaces trimmed), given twice; keep one")
    if unknown:
        names = _keys(unknown)
        free = [key for key in allowed if key not in obj]
        renames = {key: _renamed(key, free) for key in unknown}  # a typo is renamed: removing it loses the field
        fix = _keys([f"rename {shown(key)} to {shown(renames[key])}" if renames[key] else f"remove {shown(key)}"
                     for key in unknown], quoted=False) \
            if any(renames.values()) else f"remove {'them' if len(unknown) > 1 else 'it'}"
        raise LorakitError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {names}; {what} has only "
                           f"{', '.join(map(repr, listed))}: {fix}")


def _keys(keys: list, quoted: bool = True, most: int = 10) -> str:
    """The first ``most`` of a record's keys (or of fixes), each quoted and cut (``shown``), then "and N more": a
    record of 100 KB keys, or of thousands of them, is named in one short line."""
    text = ", ".join((shown(key) if quoted else key) for key in keys[:most])
    return text + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _renamed(key: Any, candidates: Iterable[str]) -> str | None:
    """The field a misspelt key most likely is ("promt" -> "prompt", "ouput" -> "output"), or the one another tool's
    name for it stands for ("output" -> "completion" beside a "prompt": :data:`PROMPT_LIKE`, ...), or None."""
    if not isinstance(key, str):
        return None
    import difflib

    candidates = list(candidates)
    match = difflib.get_close_matches(key.strip().lower(), candidates, n=1, cutoff=0.8)
    if match:
        return match[0]
    like = {"prompt": PROMPT_LIKE, "completion": COMPLETION_LIKE, "messages": MESSAGE_LIKE}
    return next((field for field in candidates if key.strip().lower() in like.get(field, ())), None)


def _normalize_keys(obj: Mapping, known: frozenset) -> Mapping:
    """``obj`` with keys that are a known key in another case or with spaces around it ("Prompt", " completion",
    as spreadsheets and CSV headers write them) renamed to it; a key that would collide is left for the caller to
    report as unknown."""
    if all(isinstance(k, str) and (k in known or k.strip().lower() not in known) for k in obj):
        return obj  # the common case: nothing to rename
    out: dict[Any, Any] = {}
    for key, value in obj.items():
        norm = key.strip().lower() if isinstance(key, str) else key
        if norm != key and norm in known and norm not in obj and norm not in out:
            key = norm
        out[key] = value
    return out


def _rename_hint(obj: Mapping) -> str:
    """For a record with no known field: which of its fields to rename to what (or "")."""
    if isinstance(obj.get("choices"), list):  # a line of logged API output: the answer, without the chat it answers
        return ("; it is an OpenAI chat completion response (the answer without the chat it answers): write each "
                "example as {\"messages\": the request's messages + choices[0].message}")
    if "custom_id" in obj and isinstance(obj.get("response"), Mapping):  # a Batch API output line: answer only
        return ("; it is an OpenAI Batch API output line (an answer without its prompt): join it with its request line "
                "by custom_id and write {\"messages\": the request's body.messages + response.body.choices[0].message}")
    if isinstance(obj.get("body"), Mapping) and "messages" in obj["body"]:  # a Batch API input line: prompt only
        return ("; it is an OpenAI Batch API request (a prompt without its answer): write each example as "
                "{\"messages\": body.messages + the answer's message from the batch's output file}")
    prompt = next((k for k in PROMPT_LIKE if k in obj), None)
    completion = next((k for k in COMPLETION_LIKE if k in obj and k != prompt), None)
    if prompt and completion:
        return f"; rename {shown(prompt)} to 'prompt' and {shown(completion)} to 'completion'"
    for key, value in obj.items():
        if isinstance(key, str) and key.strip().lower() in MESSAGE_LIKE and isinstance(value, list):
            first = value[0] if value and isinstance(value[0], Mapping) else {}
            pair = [k for k in PROMPT_LIKE if k in first][:1] + [k for k in COMPLETION_LIKE if k in first][:1]
            if len(pair) == 2 and not {"role", "from"} & set(first):  # Capybara: [{"input", "output"}, ...]
                return (f"; {shown(key)} holds {{{shown(pair[0])}, {shown(pair[1])}}} pairs: write each pair as a user and an "
                        f"assistant turn ({{\"role\": \"user\", \"content\": {pair[0]}}}, {{\"role\": \"assistant\", "
                        f"\"content\": {pair[1]}}}) under 'messages'")
            target = "conversations" if "from" in first else "messages"
            return f"; if {shown(key)} is the chat, rename it to {shown(target)}"
    if completion:
        return f"; if {shown(completion)} is the answer, rename it to 'completion' and add the 'prompt' it answers"
    return ""


def _json_field(value: Any, what: str) -> Any:
    """A field a CSV cell or a datasets column may hold as a JSON string, or as the Python repr pandas' to_csv
    writes for a column of lists (``[{'role': 'user', ...}]``), read with ``ast.literal_eval`` (literals only)."""
    if not isinstance(value, str):
        return value

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:  # json keeps the last of a key given twice, silently
        obj = dict(pairs)
        if len(obj) < len(pairs):
            seen: set[str] = set()
            key = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise LorakitError(f"{what}: the key {shown(key)} is given twice in one object; JSON readers keep only the last "
                               "one, silently: remove or rename one of them")
        return obj

    try:
        return json.loads(value, object_pairs_hook=unique)
    except json.JSONDecodeError as exc:
        if value.lstrip()[:1] in ("[", "{"):
            import ast

            try:
                return ast.literal_eval(value.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
        raise LorakitError(f"{what} is a string that is not JSON ({exc.msg}); give a list") from None


def _json_or_none(value: Any) -> Any:
    """:func:`_json_field` of a value, or None where it is not JSON (the caller that reads it reports that)."""
    with contextlib.suppress(LorakitError):
        return _json_field(value, "")
    return None


def _validate_tools(tools: Any, where: str) -> list[dict]:
    tools = _json_field(tools, f"{where}: field 'tools'")
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise LorakitError(f"{where}: field 'tools' must be a list of tool schemas ({{\"type\": \"function\", "
                           "\"function\": {\"name\": ...}}})")
    return [dict(t) for t in tools]


def _validate_tool_calls(calls: Any, at: str) -> list[dict]:
    """OpenAI tool calls, with each function's ``arguments`` parsed from its JSON string into a dict, as the chat
    templates of transformers expect (a string would be written JSON-in-a-string)."""
    calls = _json_field(calls, f"{at} tool_calls")
    if not isinstance(calls, list) or not calls:
        raise LorakitError(f"{at} tool_calls must be a non-empty list of {{\"function\": {{\"name\", \"arguments\"}}}}")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise LorakitError(f"{at} tool_calls[{j}] needs a \"function\" with a \"name\" (OpenAI's format)")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise LorakitError(f"{at} tool_calls[{j}] ({function['name']}) arguments are not JSON ({exc.msg})") from None
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def _convert_other_formats(obj: Mapping, where: str) -> Record | None:
    """An Alpaca, Dolly, question/answer, ShareGPT or Gemini record as a chat :class:`Record` (None for anything
    else).

    Detected by their required keys ("instruction" + "output"; "instruction" + "response"; "question" +
    "answer"; "conversations"; "contents"), so a record of our own shapes is never taken for one; their other keys are as
    strict as ours.
    """
    ours = {"messages", "prompt", "completion", "text"} & set(obj)
    if _turns_have(obj.get("prompt"), "role") and _turns_have(obj.get("completion"), "role"):
        # TRL's conversational prompt-completion: the prompt's turns are context (its assistant turns too, as TRL
        # masks them), the completion's turns are what is learnt
        _refuse_unknown(obj, ("prompt", "completion", "tools"), "a conversational prompt-completion record",
                        ("prompt", "completion"), where)
        context = [_normalize_keys(turn, KNOWN_MESSAGE_KEYS) for turn in obj["prompt"]]
        context = [{**turn, "weight": 0} if str(turn.get("role")).lower() == "assistant" else turn for turn in context]
        tools = {"tools": obj["tools"]} if obj.get("tools") is not None else {}
        return validate_record({"messages": [*context, *obj["completion"]], **tools}, where)
    if "contents" in obj and not ours:
        return _convert_gemini(obj, where)
    if SYSTEM_ALIAS in obj and "system" not in obj and not ours:  # OpenOrca's name for the system prompt
        obj = {("system" if key == SYSTEM_ALIAS else key): value for key, value in obj.items()}
    answer = "answer" if "answer" in obj else ANSWER_ALIAS  # OpenOrca's answer is its "response"
    if "question" in obj and answer in obj and not ours and "instruction" not in obj:
        keys = ("question", answer, "context", "system")
        _refuse_unknown(obj, keys, "a question/answer record", keys, where)
        _check_string(obj["question"], "question", where, nonempty=True, what="empty question")
        _check_string(obj[answer], answer, where, nonempty=True, what=f"empty {answer}")
        for key in ("context", "system"):
            if obj.get(key) is not None:
                _check_string(obj[key], key, where, nonempty=False)
        system, context = obj.get("system") or "", obj.get("context") or ""
        user = (f"{context}\n\n" if context.strip() else "") + obj["question"]
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": obj[answer]}]
        prompt = (f"{system}\n\n" if system.strip() else "") + QA_PROMPT.format(
            question=obj["question"], context=f"Context: {context}\n" if context.strip() else "")
        fallback = Record("prompt_completion", {"prompt": prompt, "completion": obj[answer]}, where,
                          frame=("question", system.strip() and system, None if context.strip() else obj["question"]))
        return Record("messages", {"messages": messages}, where, fallback=fallback)
    if "instruction" in obj and ("output" in obj or "response" in obj) and not ours - {"text"}:
        # Alpaca's input/output, Dolly's context/response, and the mixes other exports write
        out_key = "output" if "output" in obj else "response"
        in_key = "context" if "context" in obj and "input" not in obj else "input"
        keys = ("instruction", in_key, out_key, "system", *((HISTORY,) if in_key == "input" else ()))
        name = "a Dolly" if (in_key, out_key) == ("context", "response") else "an Alpaca"
        if isinstance(obj.get("text"), str) and all(
                isinstance(obj.get(key), str) and obj[key].strip() in obj["text"] for key in ("instruction", out_key)):
            # tatsu-lab/alpaca's "text": the same example in Alpaca's prompt format, nothing more to learn
            obj = {key: value for key, value in obj.items() if key != "text"}
        _refuse_unknown(obj, keys, f"{name} record", keys, where)
        _check_string(obj["instruction"], "instruction", where, nonempty=True, what="empty instruction")
        _check_string(obj[out_key], out_key, where, nonempty=True, what=f"empty {out_key}")
        for key in (in_key, "system"):
            if obj.get(key) is not None:
                _check_string(obj[key], key, where, nonempty=False)
        instruction, extra, system = obj["instruction"], obj.get(in_key) or "", obj.get("system") or ""
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": obj[out_key]}]
        prompt = ALPACA_PROMPT.format(instruction=instruction,
                                      input=f"### Input:\n{extra}\n\n" if extra.strip() else "")
        if system.strip():
            prompt = f"{system}\n\n{prompt}"
        fallback = Record("prompt_completion", {"prompt": prompt, "completion": obj[out_key]}, where,
                          frame=("alpaca", system.strip() and system, None if extra.strip() else instruction))
        if obj.get(HISTORY) is not None:  # earlier turns: a chat, trained on every answer (as LLaMA-Factory does)
            turns = _history_turns(obj[HISTORY], where)
            if turns:
                head = 1 if system.strip() else 0
                return validate_record({"messages": messages[:head] + turns + messages[head:]}, where)
        return Record("messages", {"messages": messages}, where, fallback=fallback)
    if "messages" in obj and "conversations" not in obj and _turns_have(_json_or_none(obj["messages"]), "from"):
        obj = {("conversations" if k == "messages" else k): v for k, v in obj.items()}  # ShareGPT turns, our key
    if "messages" in obj and obj.get("system") is not None and not ours - {"messages"}:
        return _with_system_field(obj, where)
    if "conversations" in obj and "messages" not in obj:
        # "tools" beside the chat (LLaMA-Factory's tool-use records) was refused as an unknown field, so every
        # record of such a file failed, and the calls trained without their schemas once it was deleted
        _refuse_unknown(obj, (*SHAREGPT_KEYS, SHAREGPT_TOOLS), "a ShareGPT record", (*SHAREGPT_KEYS, SHAREGPT_TOOLS),
                        where)
        tools = {"tools": obj[SHAREGPT_TOOLS]} if not _empty(obj.get(SHAREGPT_TOOLS)) else {}
        turns = _json_field(obj["conversations"], f"{where}: field 'conversations'")  # a CSV cell: JSON or pandas' repr
        if not isinstance(turns, list) or not turns:
            raise LorakitError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} objects")
        messages: list[dict[str, Any]] = []
        if obj.get("system") is not None:
            _check_string(obj["system"], "system", where, nonempty=False)
            if obj["system"].strip():
                messages.append({"role": "system", "content": obj["system"]})
        if _turns_have(turns, "role"):  # OpenAI role/content turns under ShareGPT's key (many Hub datasets)
            with _turns_as_given(where, "conversations", len(messages)):
                record = validate_record({"messages": messages + turns, **tools}, where)
            return _as_given(record, "conversations", len(messages))
        for i, turn in enumerate(turns):
            at = f"{where}: conversations[{i}]"
            if isinstance(turn, Mapping):  # "From"/"Value"; a column a datasets table filled with null is absent
                turn = {k: v for k, v in _normalize_keys(turn, KNOWN_MESSAGE_KEYS).items() if v is not None}
            if not isinstance(turn, Mapping) or set(turn) - {"from", "value", "weight", "training"}:
                raise LorakitError(f"{at} must be an object with only 'from' and 'value' (ShareGPT), got "
                                   f"{sorted(turn) if isinstance(turn, Mapping) else type(turn).__name__}")
            speaker = turn.get("from")
            role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
            if role is None:
                raise LorakitError(f"{at} is from {shown(speaker)}; expected one of {', '.join(SHAREGPT_ROLES)}")
            kept = {key: turn[key] for key in ("weight", "training") if key in turn}
            if tools and speaker.lower() == "function_call":  # with its schemas: a call the template writes as one
                messages.append({"role": role, "content": None, "tool_calls": _sharegpt_calls(turn.get("value"), at),
                                 **kept})
            else:
                messages.append({"role": role, "content": turn.get("value"), **kept})
        offset = len(messages) - len(turns)
        with _turns_as_given(where, "conversations", offset):
            record = validate_record({"messages": messages, **tools}, where)
        return _as_given(record, "conversations", offset)
    return None


@contextlib.contextmanager
def _turns_as_given(where: str, key: str, offset: int) -> Iterator[None]:
    """Errors of a converted chat that name a turn ("FILE:3: messages[2] ...") name it as the record has it: its
    ``key`` ("conversations") and its index there, ``offset`` turns (a system prompt from the record's "system"
    field) put before it. A ShareGPT record with a system field was told of "messages[2]" for its second turn,
    in a file that has no messages and a conversations list of two."""
    try:
        yield
    except LorakitError as error:
        if error.args:
            error.args = (_named_as_given(str(error), where, key, offset), *error.args[1:])
        raise


def _named_as_given(text: str, where: str, key: str, offset: int) -> str:
    """``text`` ("WHERE: messages[i] ...", or "messages[i] ..." with ``where`` "") with the turn named as the
    record has it (see :func:`_turns_as_given`); other text as it is."""
    lead = f"{re.escape(where)}: " if where else ""
    found = re.match(rf"{lead}messages\[(\d+)\]", text)
    if not found:
        return text
    i = int(found.group(1)) - offset
    named = f"{key}[{i}]" if i >= 0 else "field 'system'"
    return (f"{where}: {named}" if where else named) + text[found.end():]


def _as_given(record: Record, key: str, offset: int) -> Record:
    """``record`` (a chat converted from ``key``'s turns, ``offset`` turns put before them) remembering so."""
    return replace(record, turns_as=(key, offset)) if record.shape == "messages" else record


@contextlib.contextmanager
def turns_as_given(record: Record) -> Iterator[None]:
    """Errors raised inside (tokenizing ``record``: a tool call its template cannot write, reasoning it drops) name
    the chat's turns as the record has them: a ShareGPT record's are ``conversations[i]``, not the ``messages[i]``
    of the chat it was converted to."""
    if record.turns_as is None:
        yield
        return
    with _turns_as_given(record.where, *record.turns_as):
        yield


def turn_named_as_given(record: Record, text: str) -> str:
    """A note on one of ``record``'s turns ("messages[1] (user) has ...") naming the turn as the record has it."""
    return text if record.turns_as is None else _named_as_given(text, "", *record.turns_as)


def _sharegpt_calls(value: Any, at: str) -> list[dict[str, Any]]:
    """A LLaMA-Factory ``function_call`` turn's value (``{"name", "arguments"}`` as JSON text, or a list of them for
    parallel calls) as OpenAI tool calls, which the chat template writes in its own call syntax (Qwen's
    ``<tool_call>``, Llama 3.1's JSON, Mistral's ``[TOOL_CALLS]``), as LLaMA-Factory writes them; as plain text
    the model would learn to answer with bare JSON where its template's tool parser expects a call."""
    calls = _json_or_none(value)
    calls = [calls] if isinstance(calls, Mapping) else calls
    if not isinstance(calls, list) or not calls or not all(
            isinstance(call, Mapping) and isinstance(call.get("name"), str) and call["name"] for call in calls):
        raise LorakitError(f"{at} (function_call) must hold a call as JSON, {{\"name\": ..., \"arguments\": {{...}}}} "
                           "(or a list of them), as LLaMA-Factory's tool-use records do; fix its value, or remove the "
                           "record's 'tools' to train the turn as plain text")
    return [{"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}
            for call in calls]


def _history_turns(history: Any, where: str) -> list[dict[str, str]]:
    """LLaMA-Factory's ``history`` (``[[instruction, response], ...]``, the turns before the record's own) as user and
    assistant turns."""
    history = _json_field(history, f"{where}: field 'history'")
    if not isinstance(history, list) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            for pair in history):
        raise LorakitError(f"{where}: field 'history' must be a list of [instruction, response] pairs of strings "
                           "(LLaMA-Factory's), the turns before this record's instruction")
    return [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]


def _with_system_field(obj: Mapping, where: str) -> Record:
    """A chat with its system prompt in a ``system`` field beside ``messages`` (Anthropic's Messages format, and
    Amazon Bedrock's fine-tuning files for Claude): the prompt becomes the chat's first turn."""
    turns = _json_field(obj["messages"], f"{where}: field 'messages'")
    first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], Mapping) else {}
    role = _normalize_keys(first, KNOWN_MESSAGE_KEYS).get("role")
    if isinstance(role, str) and ROLE_ALIASES.get(role.strip().lower(), role.strip().lower()) == "system":
        raise LorakitError(f"{where}: a 'system' field and a system turn in 'messages'; keep one")
    rest = {key: value for key, value in obj.items() if key != "system"}
    system = obj["system"]
    if isinstance(system, str) and not system.strip():
        return validate_record(rest, where)
    with _turns_as_given(where, "messages", 1):
        record = validate_record({**rest, "messages": [{"role": "system", "content": system}, *(
            turns if isinstance(turns, list) else [turns])]}, where)
    return _as_given(record, "messages", 1)


def _check_string(value: Any, key: str, where: str, nonempty: bool, what: str = "") -> None:
    if value is None:
        raise LorakitError(f"{where}: field {shown(key)} is null; give it a string")
    if not isinstance(value, str):
        error = LorakitError(f"{where}: field {shown(key)} must be a string, got {_got(value)}")
        error.not_text_field = key  # a table reader says how to convert the column instead
        raise error
    if nonempty and not value.strip():
        raise LorakitError(f"{where}: {what or 'empty ' + key}: field {shown(key)} has no text; fill it or drop the record")
    _check_unicode(value, f"{where}: field {shown(key)}")


def _json_type(value: Any) -> str:
    """The JSON name of a value's type (what the user wrote), for messages."""
    names = {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    """What a value is, and how to fix it, for "must be a string, got ..."."""
    if isinstance(value, float) and value != value:
        return "NaN (an empty cell in a pandas export?); fill it or drop the record"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{type(value).__name__} {shown(value)}; write it as a JSON string (\"{shown(value)}\")"
    return _json_type(value)


def _check_unicode(value: str, what: str) -> None:
    """JSON may spell a lone UTF-16 surrogate ("\\ud800"), which is not text: tokenizers fail on it with a TypeError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LorakitError(f"{what} holds an unpaired surrogate {shown(value[exc.start])} at character {exc.start}, which "
                           "is not valid Unicode; fix the \\uXXXX escape (a cut emoji?)") from None


def _validate_messages(messages: Any, where: str) -> tuple[list[dict[str, Any]], tuple[int, ...], int]:
    """The chat as ``[{role, content, (tool keys)}]`` with content a string, through its last assistant turn; the
    indices of assistant turns with weight 0; how many turns after the last assistant turn were trimmed."""
    # CSV cells and some datasets columns hold the chat as a JSON string (or pandas' Python repr of the list)
    messages = _json_field(messages, f"{where}: field 'messages'")
    if not isinstance(messages, list) or not messages:
        raise LorakitError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out: list[dict[str, str]] = []
    unsupervised: list[int] = []
    for i, msg in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(msg, Mapping):
            raise LorakitError(f"{at} must be an object with 'role' and 'content', got {type(msg).__name__}")
        msg = _normalize_keys(msg, KNOWN_MESSAGE_KEYS)
        for key in msg:  # null, [] and {} are noise: OpenAI's API writes "refusal": null, "annotations": []
            if key not in KNOWN_MESSAGE_KEYS - {"from", "value"} and msg[key] not in (None, [], {}, ""):
                renamed = _renamed(key, [k for k in (*MESSAGE_KEYS, *TOOL_MESSAGE_KEYS, *REASONING_KEYS, "weight")
                                         if k not in msg])
                if renamed:  # "contents", "rol"
                    raise LorakitError(f"{at} has unknown key {shown(key)}; rename it to {shown(renamed)}")
                raise LorakitError(f"{at} has unknown key {shown(key)}; a message has only 'role', 'content', 'weight' "
                                   "(assistant turns), OpenAI's tool keys 'tool_calls', 'tool_call_id', 'name' and "
                                   "the assistant's 'reasoning_content' (or 'thinking')")
        if isinstance(msg.get("tool_calls"), list) and not msg["tool_calls"]:
            # no calls: what exports of a table write on every turn without any (a list column's empty cell)
            msg = {key: value for key, value in msg.items() if key != "tool_calls"}
        role, content = msg.get("role"), msg.get("content")
        if isinstance(role, str):
            role = role.strip().lower()  # "User", "Assistant"
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if msg.get("function_call") is not None:  # OpenAI's legacy single call: one tool call
            if msg.get("tool_calls") is not None:
                raise LorakitError(f"{at} has both 'function_call' and 'tool_calls'; keep one")
            call = _json_field(msg["function_call"], f"{at} function_call")
            msg = {**msg, "tool_calls": [{"type": "function", "function": call}]}
        extra: dict[str, Any] = {}
        for key in ("name", "tool_call_id"):
            if msg.get(key) is not None:
                _check_string(msg[key], key, at, nonempty=True)
                extra[key] = msg[key]
        reasoning = [key for key in REASONING_KEYS if msg.get(key) not in (None, "")]
        if len(reasoning) > 1 or (reasoning and role != "assistant"):
            raise LorakitError(f"{at} ({role}) has {' and '.join(map(repr, reasoning))}; give one, on an assistant turn")
        if reasoning:
            _check_string(msg[reasoning[0]], reasoning[0], at, nonempty=False)
            extra[reasoning[0]] = msg[reasoning[0]]
        if msg.get("tool_calls") is not None:
            if role != "assistant":
                raise LorakitError(f"{at} ({role}) has tool_calls; only assistant turns call tools")
            extra["tool_calls"] = _validate_tool_calls(msg["tool_calls"], at)
            if content is None:  # OpenAI writes content null beside tool calls; templates print None as "None"
                content = ""
        if role not in ROLES:
            raise LorakitError(f"{at} has role {shown(role)}; expected one of {', '.join(ROLES)} (or the names other tools "
                               f"give them: {', '.join(f'{a} = {r}' for a, r in ROLE_ALIASES.items())})")
        if msg.get("training") is not None:  # Axolotl's per-turn flag (message_field_training): OpenAI's weight
            if not isinstance(msg["training"], bool) or msg.get("weight") is not None:
                raise LorakitError(f"{at} has training {shown(msg['training'])}"
                                   + (" and a weight; keep one" if msg.get("weight") is not None else
                                      "; Axolotl's training flag is true or false"))
            if msg["training"] and role != "assistant":
                raise LorakitError(f"{at} ({role}) has training true; lorakit trains assistant turns only (the other "
                                   "turns are the context the answers learn from): remove the flag, or make the text "
                                   "an assistant turn")
            msg = {**msg, "weight": int(msg["training"])}
        if msg.get("weight") is not None:
            weight = msg["weight"]
            if isinstance(weight, bool) or weight not in (0, 1):
                raise LorakitError(f"{at} has weight {shown(weight)}; OpenAI's weight is 0 or 1, on assistant turns only")
            if role != "assistant" and weight == 1:
                raise LorakitError(f"{at} ({role}) has weight 1; OpenAI's weight is 0 or 1, on assistant turns only: "
                                   "the other turns are the context the answers learn from, never trained; remove it")
            # weight 0 on other turns (SlimOrca writes 0.0 on every human turn) says what is true of them anyway
            if weight == 0 and role == "assistant":
                unsupervised.append(i)
        if role == "tool" and (isinstance(content, Mapping) or (
                isinstance(content, list) and content and not all(isinstance(c, (str, Mapping)) and (
                    isinstance(c, str) or "type" in c) for c in content))):
            content = json.dumps(content, ensure_ascii=False)  # a tool's JSON result (glaive, xlam), as the model reads it
        if isinstance(content, list):
            content = _join_parts(content, at, role)
        if not isinstance(content, str):
            got = "missing" if "content" not in msg else _got(content)
            raise LorakitError(f"{at} ({role}) content must be a string, got {got}")
        _check_unicode(content, f"{at} ({role}) content")
        if role == "assistant" and not content.strip() and "tool_calls" not in extra:
            raise LorakitError(f"{at}: empty completion: the assistant turn has no text; fill it or drop the record")
        if role == "assistant" and "tool_calls" not in extra:
            _check_answer_after_reasoning(content, at)
        out.append({"role": role, "content": content, **extra})
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=None)
    if last is None:
        roles = ", ".join(dict.fromkeys(m["role"] for m in out))
        raise LorakitError(f"{where}: the chat does not end with an assistant turn (it has none, only {roles}), so "
                           "there is nothing to learn; add the assistant reply or drop the record")
    if len(unsupervised) == sum(m["role"] == "assistant" for m in out):
        raise LorakitError(f"{where}: every assistant turn has weight 0, so nothing is learnt from this chat; drop it "
                           "or set weight 1 on a turn")
    # turns after the last answer (a question left open) are not targets, and with causal attention no target
    # sees them: trimming them changes no loss term and saves their tokens
    return out[: last + 1], tuple(unsupervised), len(out) - last - 1


def _check_answer_after_reasoning(content: str, at: str) -> None:
    """Refuse an answer (without tool calls) that is all ``<think>`` reasoning: closed with nothing after it, or
    never closed. Both are generations cut at a token limit in distilled data; trained, the model learns to end its
    turn after thinking, without the answer (an empty content beside ``reasoning_content`` is refused likewise)."""
    if "</think>" in content and not content.split("</think>")[-1].strip():
        raise LorakitError(f"{at}: the assistant turn is only <think> reasoning, with no answer after </think> (a "
                           "generation cut off?), so the model would learn to stop after thinking; add the answer "
                           "or drop the record")
    if content.lstrip().startswith("<think>") and "</think>" not in content:
        raise LorakitError(f"{at}: the assistant turn opens <think> but never closes it (a generation cut at its token "
                           "limit?), so the model would learn to stop while thinking; close the reasoning with </think> "
                           "and add the answer, or drop the record")


def _join_parts(parts: list, at: str, role: str) -> str:
    """Content given as a list of parts (OpenAI's format): the text parts joined; other kinds are refused."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type", "text") if isinstance(part, Mapping) else type(part).__name__
        if isinstance(part, str):
            texts.append(part)
            continue
        if kind == "refusal" and isinstance(part.get("refusal"), str):  # OpenAI's assistant refusal: its text
            texts.append(part["refusal"])
            continue
        # OpenAI's Responses API names its text parts input_text / output_text
        if kind in ("text", "input_text", "output_text") and not isinstance(part.get("text"), str):
            raise LorakitError(f"{at} ({role}) content[{j}] is a {shown(kind)} part whose 'text' must be a string, got "
                               f"{_got(part.get('text'))}")
        if kind in ("tool_use", "tool_result"):  # Anthropic's tool blocks: OpenAI's form is what templates read
            raise LorakitError(f"{at} ({role}) content[{j}] is an Anthropic {shown(kind)} block; write tool use as OpenAI's: "
                               "the assistant turn's 'tool_calls' ([{\"id\", \"type\": \"function\", \"function\": "
                               "{\"name\", \"arguments\"}}]) and each result as a 'tool' turn with its 'tool_call_id'")
        if kind not in ("text", "input_text", "output_text"):
            raise LorakitError(f"{at} ({role}) content[{j}] is a {shown(kind)} part; lorakit trains on text only (parts "
                               "of type 'text' with a 'text' string)")
        texts.append(part["text"])
    return "".join(texts)


def __getattr__(name: str) -> Any:
    """The readers live in sources.py; they stay importable from here, where earlier code (and the README's
    example) imports them. Lazily: sources.py imports this module."""
    if name in ("read_many", "read_records", "VALIDATION_SPLITS"):
        from lorakit.train import sources

        return getattr(sources, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
