"""Request bodies of the OpenAI-compatible endpoints, and the OpenAI error body.

Unknown fields are refused (``extra="forbid"``), so a typo never silently changes a request. OpenAI fields that
lorakit does not implement are accepted only at their "off" value and otherwise refused by name. Types are strict,
as OpenAI's are: ``"max_tokens": "10"`` or ``true`` is refused, never read as 10 or 1 (a float field takes an int).
``null`` is OpenAI's "not given" for every optional field (client wrappers send ``"temperature": null``), so it
means the field's default; only a required field (``model``, ``prompt``, ``messages``) must not be null.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Union

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator



def forced_tool_choice(value, named: str | None, names: list[str], form: str):
    """A ``tool_choice`` other than "auto"/"none": "required", or a function named ``named`` (the request's form of
    it already read; None when it names none), checked against the request's tool ``names``. ``form``: how to name
    one, for the error."""
    if value != "required" and named is None:
        raise ValueError(f"tool_choice {str(value)[:60]!r} is not supported; send 'auto', 'none', 'required' or {form}")
    if not names:
        # llama-index's structured_predict sends "required" without tools for a model it does not know; OpenAI and
        # vLLM refuse it too, so the message says what that client can send instead
        raise ValueError(f"tool_choice {str(value)[:60]!r} is not supported without tools; send the functions in "
                         "tools, or tool_choice 'none' (llama-index: llm_kwargs={'tool_choice': 'none'}) with "
                         "response_format json_schema for an answer held to a schema")
    if named is not None and named not in names:
        raise ValueError(f"tool_choice names {named[:64]!r}, which is not among the tools ({', '.join(names)[:200]})")
    return value


ALLOWED_MODES = ("auto", "required")


def allowed_tools(value: Any, chat: bool) -> tuple[str, list[str]] | None:
    """OpenAI's ``{"type": "allowed_tools", ...}`` tool_choice -> ``(mode, the allowed function names, in order,
    once each)``; None for any other tool_choice. Raises ``ValueError`` (one line) for a malformed one. Chat's form
    nests ``{"mode", "tools"}`` under ``allowed_tools`` and names a function ``{"type": "function", "function":
    {"name": ...}}``; the Responses API's is flat (``{"type": "allowed_tools", "mode", "tools"}``, each tool
    ``{"type": "function", "name": ...}``). A listed tool may carry the rest of its definition (clients pass the
    same tool objects): only its name is read."""
    if not (isinstance(value, dict) and value.get("type") == "allowed_tools"):
        return None
    where = "tool_choice.allowed_tools" if chat else "tool_choice"
    body = value.get("allowed_tools") if chat else value
    extra = set(value) - ({"type", "allowed_tools"} if chat else {"type", "mode", "tools"})
    if not isinstance(body, dict) or extra or (chat and set(body) - {"mode", "tools"}):
        shape = ("{'type': 'allowed_tools', 'allowed_tools': {'mode': 'auto', 'tools': [{'type': 'function', "
                 "'function': {'name': NAME}}]}}" if chat else
                 "{'type': 'allowed_tools', 'mode': 'auto', 'tools': [{'type': 'function', 'name': NAME}]}")
        raise ValueError(f"tool_choice of type 'allowed_tools' takes the form {shape}")
    mode, tools = body.get("mode"), body.get("tools")
    if mode not in ALLOWED_MODES:
        raise ValueError(f"{where}.mode must be 'auto' or 'required', got {str(mode)[:40]!r}")
    if not isinstance(tools, list) or not tools:
        raise ValueError(f"{where}.tools must list the functions the model may call (at least one)")
    names = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            shown = f"a {str(kind)[:40]!r} tool" if kind else "no tool (no type)"
            raise ValueError(f"{where}.tools[{index}] is {shown}; only function tools can be allowed (this server "
                             "runs no other kind)")
        name = (tool.get("function") or {}).get("name") if chat and isinstance(tool.get("function"), dict) \
            else None if chat else tool.get("name")
        if not isinstance(name, str):
            said = "{'type': 'function', 'function': {'name': NAME}}" if chat else "{'type': 'function', 'name': NAME}"
            raise ValueError(f"{where}.tools[{index}] names no function; send {said}")
        names.append(name)
    return mode, list(dict.fromkeys(names))


def check_allowed(value: Any, chat: bool, names: list[str]) -> Any:
    """An allowed_tools tool_choice (:func:`allowed_tools`) checked against the request's tool ``names``: each
    allowed function must be one of them (it is rendered into the prompt with them; allowed_tools only narrows
    which the answer may call)."""
    mode, allowed = allowed_tools(value, chat)
    if not names:
        raise ValueError("tool_choice 'allowed_tools' is not supported without tools; send the functions in tools")
    unknown = next((name for name in allowed if name not in names), None)
    if unknown is not None:
        raise ValueError(f"tool_choice allows {unknown[:64]!r}, which is not among the tools "
                         f"({', '.join(names)[:200]}); allowed_tools names functions given in tools")
    return value


def choice_forces(value: Any, chat: bool) -> str | None:
    """The function a tool_choice forces the answer to call: its name (a named function, or allowed_tools
    "required" with one function), "" for any of those it may call ("required", allowed_tools "required" with
    several), None when not forced ("auto", "none", allowed_tools "auto")."""
    if value == "required":
        return ""
    allowed = allowed_tools(value, chat)
    if allowed is not None:
        mode, names = allowed
        return None if mode == "auto" else names[0] if len(names) == 1 else ""
    if isinstance(value, dict):
        return value["function"]["name"] if chat else value["name"]
    return None


def callable_names(value: Any, chat: bool, names: list[str]) -> set[str]:
    """The functions an answer's calls may name: the request's tools ``names``, or those allowed_tools allows."""
    allowed = allowed_tools(value, chat)
    return set(names) if allowed is None else set(allowed[1])


def gated_names(value: Any, chat: bool, names: list[str]) -> list[str] | None:
    """The function names a call must be restricted to while the model writes them (``tool_names.NameGate``):
    allowed_tools' where they are fewer than the tools and the answer is not forced to call one named function
    (whose name the prompt then ends with); None otherwise."""
    allowed = allowed_tools(value, chat)
    if allowed is None or set(allowed[1]) == set(names) or (allowed[0] == "required" and len(allowed[1]) == 1):
        return None
    return allowed[1]


def unique_tools(tools: list | None, names: list[str]) -> list | None:
    """The request's ``tools`` (None for none), refused when two share a function name (``names``, in order)."""
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise ValueError(f"two tools are named {twice!r}; give each function its own name")
    return tools or None

class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


MAX_MESSAGE = 1000  # characters: an error quoting a 20 MB config value must not answer with 20 MB


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body; the message is one line of at most ``MAX_MESSAGE`` characters."""
    message = " ".join(message.splitlines())
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    if param is not None and len(param) > 200:
        param = param[:197] + "..."
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _template_kwargs(value: dict | None, fields: tuple[str, ...] = ()) -> dict | None:
    """A request's ``chat_template_kwargs`` (vLLM's extension), checked as training checks its own; ``fields``: the
    rendering options this request takes as fields of its own, where one named inside is said to belong."""
    if value is None:
        return None
    for key in fields:  # training's words ("set by lorakit itself ... remove it") would hide the field that does it
        if isinstance(value, dict) and key in value:
            raise ValueError(f"chat_template_kwargs: {key!r} is a field of the request, not a template option; send "
                             f"it beside \"messages\" (\"{key}\": ...) instead of inside chat_template_kwargs")
    import json

    from lorakit.errors import LorakitError
    from lorakit.train.config import check_template_kwargs

    if len(value) > 32 or len(json.dumps(value)) > 4096:
        raise ValueError("chat_template_kwargs is over 32 options or 4 KiB; a chat template takes a few flags")
    try:
        return check_template_kwargs(value, "chat_template_kwargs")
    except LorakitError as error:
        raise ValueError(str(error)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """``"field": null`` for an optional field reads as the field left out (OpenAI's nullable fields)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if not (v is None and k in fields and not fields[k].is_required() and fields[k].default is not None)}


def _off(value: Any, name: str, allowed: tuple, why: str) -> Any:
    """An OpenAI field lorakit does not implement: only its "off" values pass."""
    if value is not None and value not in allowed:
        raise ValueError(f"{name} is not supported ({why}); leave it out")
    return value


def _finite(default: float, **bounds) -> Any:
    return Field(default, allow_inf_nan=False, **bounds)


MAX_STOPS = 16
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit, and vLLM's default --max-logprobs

# vLLM's guided decoding backends (guided_decoding_backend, optionally "name:options"): accepted, none changes a thing
GUIDED_BACKENDS = ("auto", "guidance", "llguidance", "xgrammar", "outlines", "lm-format-enforcer")


def json_schema_value(value: Union[dict, str, None], field: str) -> dict | None:
    """A JSON schema sent as an object or as its JSON text (vLLM takes both) -> the object."""
    if not isinstance(value, str):
        return value
    import json

    try:
        value = json.loads(value)
    except ValueError as error:
        raise ValueError(f"{field} is not JSON ({str(error)[:60]}); send a JSON schema (an object or its text)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON schema (an object)")
    return value


MAX_BIASED_TOKENS = 1024  # logit_bias entries: clients send a few (ban or force some tokens), not a vocabulary


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool = True  # OpenAI pads chunks against side channels; lorakit sends no padding field
    # vLLM's: with include_usage, every chunk carries the usage so far (not only the last, choice-less one)
    continuous_usage_stats: bool = False


MAX_DOCUMENTS = 256  # RAG documents of one chat request (vLLM's documents: {"title", "text"} objects)
MAX_TEMPLATE_CHARS = 256 * 1024  # a request's chat_template: real ones are a few KiB (Qwen3's ~4 KiB)
MAX_TOKEN_IDS = 1024  # stop_token_ids / allowed_token_ids entries: a few ends, or a label set, not a vocabulary
MAX_BAD_WORDS = 128  # bad_words: each is looked for at every token of the answer


def _stream_options(value: Any, info) -> Any:
    """OpenAI's (and vLLM's) rule: stream_options goes with ``stream: true`` only."""
    if value is not None and info.data.get("stream") is not True:
        raise ValueError("stream_options is only allowed when stream is true; send stream: true, or leave "
                         "stream_options out")
    return value


class _Penalized(_Strict):
    """OpenAI's penalties and logit_bias: chat and completions take them, and /v1/responses as vLLM's does."""

    # OpenAI's: subtracted from the logit of each token the answer already holds (presence once, frequency per time)
    presence_penalty: float = _finite(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = _finite(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict | None) -> dict | None:
        """OpenAI's form: token ids as decimal strings -> a bias in [-100, 100] added to the token's logit (the
        ids are checked against the vocabulary when the request is served: ``bias_pairs``)."""
        if not value:
            return None
        if len(value) > MAX_BIASED_TOKENS:
            raise ValueError(f"logit_bias has {len(value):,} tokens, over the limit of {MAX_BIASED_TOKENS:,}")
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise ValueError(f"logit_bias key {key[:40]!r} is not a token id: the keys are token ids written as "
                                 'strings, such as {"1234": -100}')
            if not math.isfinite(bias) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias of token {key[:40]} is {bias}; a bias is between -100 and 100")
        return value

    def bias_pairs(self) -> list[tuple[int, float]]:
        """``logit_bias`` as ``(token id, bias)`` pairs, one per id ("07" and "7" name one token: the last
        given counts, as in a JSON object that names a key twice)."""
        return list({int(key): float(bias) for key, bias in (self.logit_bias or {}).items()}.items())


# vllm_xargs values, as vLLM types them: a string or number, or a list of them
XargValue = Union[str, int, float, list[Union[str, int, float]]]


class RepetitionDetection(_Strict):
    """vLLM's ``repetition_detection``: the answer ends once its last tokens are a pattern of ``min_pattern_size``
    (0: 1) to ``max_pattern_size`` tokens said ``min_count`` times (``lorakit.serve.repetition``); a
    ``max_pattern_size`` of 0 turns it off."""

    max_pattern_size: int = Field(0, ge=0, le=1024)
    min_pattern_size: int = Field(0, ge=0)
    min_count: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        """vLLM's rules: min_pattern_size at most max_pattern_size, and a repetition is said twice or more."""
        if self.min_pattern_size > self.max_pattern_size:
            raise ValueError(f"min_pattern_size ({self.min_pattern_size}) is over max_pattern_size "
                             f"({self.max_pattern_size})")
        if self.max_pattern_size and self.min_count < 2:
            raise ValueError("min_count must be 2 or more with a max_pattern_size (a pattern said once is no "
                             "repetition)")
        return self

    def watch(self):
        """A new answer's check (``RepetitionWatch``), or None when off."""
        from lorakit.serve.repetition import RepetitionWatch

        if not self.max_pattern_size:
            return None
        return RepetitionWatch(self.max_pattern_size, self.min_pattern_size, self.min_count)


class _VllmRequest(_Penalized):
    """vLLM's request fields that are no sampling option (sent in ``extra_body``), each as vLLM serves them when
    none of its optional machinery is configured: ``request_id`` names the answer (its ``id``); ``cache_salt``
    keeps the request's prompt out of other salts' cached K/V (the static decoder's prefix cache shares blocks only
    under one salt, as vLLM's); what tunes vLLM's own machinery (``kv_transfer_params`` / ``ec_transfer_params``: a disaggregated-serving connector; ``vllm_xargs``: custom
    extensions; ``session_id``; ``stream_interval``: how many tokens one chunk batches) is accepted and changes
    nothing, as in a vLLM without that machinery; ``repetition_detection`` ends an answer that loops (applied by
    the server as each token comes: ``RepetitionDetection``). What would change the answer and is not implemented is refused
    by name: a non-zero ``priority`` (vLLM's default scheduler refuses it too), ``logits_processors`` (vLLM takes
    them only from a server flag), ``logprob_token_ids`` and ``watermarking``. ``thinking_token_budget`` caps the
    reasoning block at that many tokens, then the block's closing marker is forced (``reasoning.ThinkBudget``);
    -1 is vLLM's "unlimited"."""

    request_id: str | None = Field(None, min_length=1, max_length=256)
    session_id: str | None = Field(None, max_length=256)
    priority: int = Field(0, ge=-(2**63), le=2**63 - 1)
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    kv_transfer_params: dict | None = None
    ec_transfer_params: dict | None = None
    vllm_xargs: dict[str, XargValue] | None = None
    stream_interval: int | None = Field(None, ge=1)
    watermarking: bool | None = None
    logits_processors: list | None = None
    thinking_token_budget: int | None = None
    logprob_token_ids: list[int] | None = None
    repetition_detection: RepetitionDetection | None = None
    # vLLM's render-endpoint options, "ignored on regular generation endpoints" (its words), and the skip of a
    # mixture-of-experts routing record this server never returns
    return_token_offsets: bool = False
    return_mm_kwargs: bool = True
    routed_experts_prompt_start: int = Field(0, ge=0)

    @field_validator("vllm_xargs")
    @classmethod
    def _finite_xargs(cls, value: dict | None) -> dict | None:
        """Python's json reads NaN and Infinity, which are no JSON numbers (vLLM's parser refuses them)."""
        from lorakit.train.config import _non_finite  # the walk chat_template_kwargs' check uses

        for key, item in (value or {}).items():
            number = _non_finite(item)
            if number is not None:
                raise ValueError(f"vllm_xargs: {key!r} holds {number}, which is not a JSON number; give a finite "
                                 "number")
        return value

    @field_validator("priority")
    @classmethod
    def _first_come(cls, value: int) -> int:
        return _off(value, f"priority {value}", (0,), "this server answers requests in arrival order, as vLLM's "
                    "default --scheduling-policy fcfs, which refuses a priority too; send 0")

    @field_validator("watermarking")
    @classmethod
    def _no_watermark(cls, value: bool | None) -> bool | None:
        return _off(value, "watermarking", (False,), "this server adds no watermark to the tokens it draws")

    @field_validator("logits_processors")
    @classmethod
    def _no_processors(cls, value: list | None) -> list | None:
        return _off(value or None, "logits_processors", (None,), "this server loads no logits processor code "
                    "named by a request; logit_bias, allowed_token_ids, bad_words and min_tokens shape the logits")

    @field_validator("thinking_token_budget")
    @classmethod
    def _budget(cls, value: int | None) -> int | None:
        """vLLM's rule: a non-negative number of tokens, or -1 for unlimited (read as not given)."""
        if value is not None and value < -1:
            raise ValueError(f"thinking_token_budget is {value}; send a number of tokens (0 or more), or -1 for "
                             "unlimited")
        return None if value == -1 else value

    @field_validator("logprob_token_ids")
    @classmethod
    def _no_chosen_logprobs(cls, value: list[int] | None) -> list[int] | None:
        return _off(value, "logprob_token_ids", (None,), "send logprobs with top_logprobs (up to 20 of the most "
                    "likely tokens), or allowed_token_ids to choose among a label set")

    def answer_id(self, prefix: str, header_id: str | None = None, own_id: str | None = None) -> str:
        """The answer's ``id``, as vLLM's ``_base_request_id`` picks it: ``prefix`` and the client's
        ``X-Request-Id`` header (``header_id``, as ``transport.RequestId`` took it), else the body's
        ``request_id``, else ``own_id`` (the server's id of the request, its ``x-request-id``), else a random one."""
        import uuid

        chosen = header_id or self.request_id or own_id or uuid.uuid4().hex
        return f"{prefix}-{chosen}"


class _VllmSampling(_VllmRequest):
    """vLLM's sampling fields beyond OpenAI's (sent in ``extra_body``), each as vLLM defines it: the engine applies
    them row by row (``lorakit.serve.sampling.RowOptions``), the answer's text follows the text ones. Beam search
    (``use_beam_search``, ``length_penalty``) is accepted at its "off" value only."""

    repetition_penalty: float = _finite(1.0, gt=0.0)  # prompt's and answer's tokens: logit / p if > 0, else x p
    min_p: float = _finite(0.0, ge=0.0, le=1.0)  # drop tokens under min_p x the most likely one's probability
    min_tokens: int = Field(0, ge=0)  # no end of turn, stop token or stop string before this many tokens
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_IDS)  # end the answer (their text left out)
    ignore_eos: bool = False  # the end of turn does not end the answer (stop_token_ids still do)
    include_stop_str_in_output: bool = False  # the stop string (or stop token's text) stays at the answer's end
    skip_special_tokens: bool = True  # false: special tokens' text stays in the answer
    spaces_between_special_tokens: bool = True  # passed to the tokenizer's decode (slow tokenizers read it)
    allowed_token_ids: list[int] | None = Field(None, min_length=1, max_length=MAX_TOKEN_IDS)  # the only tokens drawn
    # words the answer may not hold (each with and without a leading space, as vLLM tokenizes them: the last token
    # of each is refused where the answer's last tokens are the rest)
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    use_beam_search: bool = False
    length_penalty: float = _finite(1.0)

    @field_validator("bad_words")
    @classmethod
    def _words(cls, value: list[str] | None) -> list[str] | None:
        if value and any(not word.strip() or len(word) > 256 for word in value):
            raise ValueError("bad_words takes non-blank words of at most 256 characters")
        return list(dict.fromkeys(value)) if value else None

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids(cls, value: list[int] | None, info) -> list[int] | None:
        """Token ids (checked against the vocabulary when the request is served), each once."""
        if value is None:
            return None
        if any(token < 0 for token in value):
            raise ValueError(f"{info.field_name} holds {min(value)}; token ids are 0 or more")
        return list(dict.fromkeys(value))

    @field_validator("use_beam_search")
    @classmethod
    def _no_beams(cls, value: bool) -> bool:
        return _off(value, "use_beam_search", (False,), "this server decodes greedily or samples, it runs no beam "
                    "search; send n for several answers")

    @field_validator("length_penalty")
    @classmethod
    def _no_length_penalty(cls, value: float) -> float:
        return _off(value, f"length_penalty {value}", (1.0,), "it weighs beams by length in beam search, which this "
                    "server does not run")

    @model_validator(mode="after")
    def _min_within_max(self):
        """min_tokens at most the answer's token limit (vLLM's rule), whichever field sets it."""
        for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            limit = getattr(self, field, None)
            if limit is not None:
                if self.min_tokens > limit:
                    raise ValueError(f"min_tokens ({self.min_tokens}) is over {field} ({limit}); send a min_tokens "
                                     f"of at most {field}")
                break
        return self

    def answer_ends(self, ends: tuple[int, ...], extra: tuple[int, ...] = ()) -> tuple[int, ...]:
        """The tokens that end the answer (``SamplingParams.stop_token_ids``): the model's end of turn ``ends``
        unless ignore_eos, ``extra`` (a tool call's end) and the request's stop_token_ids."""
        return (() if self.ignore_eos else tuple(ends)) + tuple(extra) + tuple(self.stop_token_ids or ())

    def banned_words(self, encode) -> tuple[tuple[int, ...], ...]:
        """``bad_words`` as token sequences, as vLLM reads them: each word (leading spaces stripped) as ``encode``
        (text -> ids, no special tokens) gives it, and with one leading space where that spells it in as many
        tokens, starting with another (the word inside a sentence)."""
        banned: list[tuple[int, ...]] = []
        for word in self.bad_words or ():
            bare = tuple(encode(word.lstrip()))
            spaced = tuple(encode(" " + word.lstrip()))
            banned += [bare] + ([spaced] if spaced and len(spaced) == len(bare) and spaced[0] != bare[0] else [])
        return tuple(dict.fromkeys(words for words in banned if words))

    def served_options(self, ends: tuple[int, ...], vocab: int, format_param: str | None,
                       encode=None) -> tuple[Any, dict]:
        """The request's vLLM options as the server applies them: the engine's (``sampling.RowOptions``; ``ends``:
        the model's end-of-turn tokens, which min_tokens holds back even with ignore_eos, as in vLLM) and the
        text's (``TextAssembler``'s keywords, with ``stop_token_ids``: the tokens whose text is left out, the end
        of turn unless ignore_eos and the request's stop_token_ids, both kept by include_stop_str_in_output);
        ``encode``: the request's tokenizer (text -> ids), which spells its bad_words.

        Token ids at or past ``vocab`` are the client's 400 (as indices they would fail the engine's whole batch);
        the fields that move the answer's end are refused beside a format (``format_param``: the field that gave
        it), whose grammar decides where the answer ends."""
        from lorakit.serve.sampling import OFF, RowOptions

        for name in ("stop_token_ids", "allowed_token_ids"):
            outside = [token for token in getattr(self, name) or () if token >= vocab]
            if outside:
                raise APIError(400, f"{name} token id {outside[0]} is not in this model's vocabulary (ids 0 to "
                               f"{vocab - 1})", param=name)
        if format_param is not None:
            for name, given in (("min_tokens", self.min_tokens > 0), ("stop_token_ids", bool(self.stop_token_ids)),
                                ("ignore_eos", self.ignore_eos)):
                if given:
                    raise APIError(400, f"{name} cannot be combined with {format_param} (the format decides where "
                                   "the answer ends); leave one of them out", param=name)
        if self.bad_words and encode is None:
            raise APIError(400, "bad_words is not supported on this endpoint; ban tokens with logit_bias "
                           '{"<id>": -100}', param="bad_words")
        options = RowOptions(repetition_penalty=self.repetition_penalty, min_p=self.min_p, min_tokens=self.min_tokens,
                             ends=tuple(ends) if self.min_tokens else (),
                             allowed=tuple(self.allowed_token_ids) if self.allowed_token_ids else None,
                             banned=self.banned_words(encode) if self.bad_words else ())
        hidden = () if self.include_stop_str_in_output else self.answer_ends(ends)
        return (OFF if options == OFF else options), {
            "stop_token_ids": hidden, "include_stop": self.include_stop_str_in_output,
            "skip_special": self.skip_special_tokens, "spaces": self.spaces_between_special_tokens,
            "min_tokens": self.min_tokens}


class _Sampling(_VllmSampling):
    """Fields both endpoints share."""

    model: str
    temperature: float = _finite(1.0, ge=0.0, le=2.0)
    top_p: float = _finite(1.0, ge=0.0, le=1.0)  # 0 (OpenAI takes it): the most likely token only
    top_k: int = Field(0, ge=-1)  # not OpenAI's: vLLM's (and llama.cpp's), which clients built for them send; -1, 0: off
    n: int = Field(1, ge=1, le=16)  # choices; each is one engine row, so a request holds at most 16
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # the range torch.Generator.manual_seed takes
    user: str | None = None
    safety_identifier: str | None = None  # OpenAI's newer names for ``user``: identify the caller, nothing more
    prompt_cache_key: str | None = None
    # vLLM's older structured-output fields (extra_body), each one format as structured_outputs' namesake reads it
    # (guided_formats); guided_whitespace_pattern: the JSON's whitespace (a regex); guided_decoding_backend picks
    # vLLM's backend: any of its names is accepted and ignored (llguidance, vLLM's "guidance", serves every format)
    guided_json: Union[dict, str, None] = None
    guided_regex: str | None = Field(None, min_length=1)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=4096)
    guided_grammar: str | None = Field(None, min_length=1)
    guided_whitespace_pattern: str | None = Field(None, min_length=1)
    guided_decoding_backend: str | None = None
    # vLLM's: keep only the prompt's last k tokens (-1: as many as the server takes); truncation_side "right":
    # its first k instead
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    # vLLM's: each prompt token's log-probability and the k most likely tokens there (0: the token's own only),
    # answered as vLLM's ``prompt_logprobs`` list (None for the first token)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: logprobs name tokens "token_id:<id>" (text that is no valid UTF-8 alone stays identifiable)
    return_tokens_as_token_ids: bool = False
    # vLLM's: the answer carries the prompt's token ids and each choice's (streamed: each chunk its new ones)
    return_token_ids: bool = False

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, value: Any, info) -> Any:
        return _stream_options(value, info)

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("truncate_prompt_tokens 0 would leave no prompt; send k >= 1 (keep the last k prompt "
                             "tokens) or -1 (as many as the server takes)")
        return value

    def truncated(self, prompts: list[list[int]], most: int, echo: bool) -> list[list[int]]:
        """vLLM's ``truncate_prompt_tokens``: each prompt's last k tokens (-1: the last ``most``, what the server
        takes); refused with echo, whose answer would start with a prompt the model did not read."""
        k = self.truncate_prompt_tokens
        if k is None:
            if self.truncation_side is not None:
                raise APIError(400, "truncation_side says which end truncate_prompt_tokens cuts; send "
                               "truncate_prompt_tokens with it, or leave it out", param="truncation_side")
            return prompts
        if echo:
            raise APIError(400, "truncate_prompt_tokens cannot be combined with echo (the answer would start with a "
                           "prompt the model did not read); leave one of them out", param="truncate_prompt_tokens")
        k = max(1, most) if k == -1 else k
        return [ids[:k] if self.truncation_side == "right" else ids[-k:] for ids in prompts]

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_whole(cls, value: int | None, info) -> int | None:
        """vLLM's rule: prompt_logprobs come with the whole answer, never in a stream."""
        if value is not None and info.data.get("stream"):
            raise ValueError("prompt_logprobs are not available when stream is true (vLLM's rule); send stream false")
        return value

    @field_validator("guided_json")
    @classmethod
    def _guided_schema(cls, value: Union[dict, str, None]) -> dict | None:
        return json_schema_value(value, "guided_json")

    @field_validator("guided_decoding_backend")
    @classmethod
    def _backend(cls, value: str | None) -> str | None:
        if value is not None and value.split(":", 1)[0] not in GUIDED_BACKENDS:
            raise ValueError(f"guided_decoding_backend {value[:40]!r} is not one of vLLM's ({', '.join(GUIDED_BACKENDS)}"
                             "); this server decodes every format with llguidance (vLLM's 'guidance'), so it may be "
                             "left out")
        return value

    def guided_formats(self) -> list[tuple[tuple, str]]:
        """The guided_* formats given, each ``(spec, field)`` (``spec`` as :meth:`StructuredOutputs.spec`); more
        than one is the server's 400 (with the other format fields)."""
        given = []
        for kind, value in (("json", self.guided_json), ("regex", self.guided_regex), ("choice", self.guided_choice),
                            ("grammar", self.guided_grammar)):
            if value is not None:
                spec = StructuredOutputs.model_validate({kind: value}).spec()
                given.append(((spec[0], spec[1], f"guided_{kind}", None), f"guided_{kind}"))
        return given

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> list[str]:
        stops = [value] if isinstance(value, str) else value if isinstance(value, list) else [] if value is None else None
        if stops is None or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        # OpenAI takes 4; lm-eval's generation tasks send their stop words plus the end-of-text string (5 or more),
        # and each costs one search of the newest characters per token, so 16 is as cheap
        if len(stops) > MAX_STOPS or any(not s or len(s) > 256 for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings of at most 256 characters")
        return stops


MAX_PROMPTS = 64  # prompts in one completions request (lm-eval sends its batch as one request)


class CompletionRequest(_Sampling):
    # always a list of prompts, each a string or token ids: the validator reads OpenAI's four forms into it
    prompt: list[Union[str, list[int]]]
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo (score the prompt, generate nothing)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False  # the answer's text (and logprobs) start with the prompt's
    best_of: int | None = None
    suffix: str | None = None
    response_format: "ResponseFormat | None" = None  # vLLM's extension: JSON answers here too (structured.py)
    # vLLM's: false encodes a text prompt without the tokenizer's special tokens (no BOS)
    add_special_tokens: bool = True
    structured_outputs: "StructuredOutputs | None" = None  # vLLM's extension: json, regex, choice or grammar
    prompt_embeds: Union[str, list[str], None] = None  # vLLM's: refused (prompts are text or token ids here)

    @field_validator("prompt_embeds")
    @classmethod
    def _no_embeds(cls, value: Any) -> Any:
        return _off(value, "prompt_embeds", (None,), "this server reads prompts as text or token ids; send prompt")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        """OpenAI's four prompt forms: a string, token ids, or a batch (a list) of either."""
        if isinstance(value, str) or (isinstance(value, list) and value and _token_ids(value)):
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, str) or _token_ids(v) for v in value):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"{len(value)} prompts in one request, over the limit of {MAX_PROMPTS}; split them")
            if any(isinstance(v, list) and not v for v in value):
                raise ValueError("a prompt of the batch is empty")
            return value
        if isinstance(value, list) and not value:
            raise ValueError("prompt is empty")
        raise ValueError("prompt must be a string, a list of token ids (integers), or a list of either")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None, info) -> int | None:
        """best_of = n draws n answers and returns them all, as vLLM does; more would need ranking the samples (1:
        the "off" value clients send)."""
        n = info.data.get("n", 1)
        if value not in (None, 1, n):
            raise ValueError(f"best_of {value} is not supported (only best_of equal to n: this server returns every "
                             "answer it draws, it does not rank more samples); send n alone")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value


def _token_ids(value: Any) -> bool:
    """A list of token ids (an empty list counts: it is refused later as an empty prompt, by name)."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


class CacheBreakpoint(_Strict):
    """OpenAI's ``prompt_cache_breakpoint`` of a content part: where a reusable prompt prefix ends (a hint for
    OpenAI's prompt cache; this server keeps none, so it changes nothing)."""

    mode: Literal["explicit"]
    ttl: Literal["30m", "12h"] | None = None


class CacheOptions(_Strict):
    """OpenAI's ``prompt_cache_options`` (its prompt cache's breakpoints and lifetime): accepted, no effect."""

    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class CallFunction(_Strict):
    name: str = Field(min_length=1, max_length=256)
    arguments: Union[str, dict] = "{}"  # OpenAI sends JSON text; a dict is taken as well

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: Union[str, dict]) -> Union[str, dict]:
        if isinstance(value, str) and value.strip():
            import json

            try:
                parsed = json.loads(value)
            except ValueError as error:
                raise ValueError(f"arguments are not JSON ({str(error)[:60]}); send a JSON object as text") from None
            if not isinstance(parsed, dict):
                raise ValueError("arguments must be a JSON object")
        return value

    def parsed_arguments(self) -> dict:
        """The arguments as a dict, as chat templates read them (``arguments | tojson``)."""
        import json

        if isinstance(self.arguments, dict):
            return self.arguments
        return json.loads(self.arguments) if self.arguments.strip() else {}


class ToolCall(_Strict):
    """A call of an earlier assistant turn, as the answer gave it (the openai package's ``model_dump()``)."""

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CallFunction


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None  # before content: content may be null only beside calls
    # what the openai package's ``message.model_dump()`` of an earlier answer holds: a client that appends the
    # reply to its history sends them back. Empty, they change nothing; annotations (an answer's citations) are
    # metadata the chat template never shows
    content: Union[str, list[TextPart], None] = Field(None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = Field(None, validate_default=True, max_length=256)
    refusal: str | None = None
    annotations: list | None = None
    audio: None = None
    function_call: None = None
    # an earlier answer's reasoning (a reasoning model's ``<think>`` / ``[THINK]`` block, as this server and vLLM
    # return it; vLLM's newer name ``reasoning``): the chat template decides whether it is written again (Qwen3:
    # after the last question)
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, value: list | None, info) -> list | None:
        if value is not None and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return value or None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any, info) -> Any:
        if value is None:
            if info.data.get("role") == "assistant" and info.data.get("tool_calls"):
                return value  # OpenAI's assistant turn that only calls tools
            raise ValueError("content is required (only an assistant message with tool_calls may leave it null)")
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts ({'type': 'text', 'text': ...})")
        if info.data.get("role") == "assistant":  # OpenAI's assistant parts: text, or a refusal (what it said)
            value = [{"type": "text", "text": part["refusal"]} if isinstance(part, dict) and part.get("type") ==
                     "refusal" and set(part) == {"type", "refusal"} and isinstance(part["refusal"], str) else part
                     for part in value]
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                shown = repr(kind)[:40] if kind is not None else type(part).__name__
                raise ValueError(f"only text content parts are supported, got a part of type {shown}")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, value: str | None, info) -> str | None:
        if info.data.get("role") == "tool" and value is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def reasoning_text(self) -> str | None:
        """An assistant turn's reasoning, as sent back (None: none)."""
        return (self.reasoning_content or self.reasoning or None) if self.role == "assistant" else None


class FunctionSchema(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict | None = None
    # OpenAI's promise that arguments follow the schema; without constrained decoding it is not kept, but the openai
    # package's pydantic_function_tool and the Agents SDK set it on every tool, so it is accepted (as vLLM does)
    strict: bool | None = None


class Tool(_Strict):
    """An OpenAI function tool: ``{"type": "function", "function": {"name", "description", "parameters"}}``."""

    type: Literal["function"]
    function: FunctionSchema


MAX_TOOLS = 128  # OpenAI's limit


FORMATS = ("text", "json_object", "json_schema")


def _format_type(value: str) -> str:
    if value not in FORMATS:
        raise ValueError(f"format type {value[:40]!r} is not supported; send 'text', 'json_object' or 'json_schema'")
    return value


class JsonSchemaFormat(_Strict):
    """OpenAI's ``json_schema``: the answer is JSON matching ``schema`` (constrained decoding: structured.py), so
    ``strict`` true or false, the answer always matches it."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """Chat's ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` (any JSON object) or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``."""

    type: str
    json_schema: JsonSchemaFormat | None = None

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        return _format_type(value)

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs its json_schema: {'type': 'json_schema', 'json_schema': "
                             "{'name': ..., 'schema': {...}}}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema goes with type 'json_schema' only, not {self.type!r}")
        return self

    def spec(self) -> tuple[str, dict | None, str] | None:
        """(type, schema, name) of a JSON format; None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return "json_object", None, "json_object"
        return "json_schema", self.json_schema.schema_, self.json_schema.name


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_DATA = ("enum", "const", "default", "examples")  # values, not schemas


def closed_objects(schema: Any) -> Any:
    """A copy of JSON schema ``schema`` where every object schema that does not set ``additionalProperties``
    takes no properties beyond those it names (vLLM's disable_additional_properties); the rest is unchanged."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # names -> schemas: the mapping is no schema itself
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _SCHEMA_DATA else closed_objects(value)
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs`` (sent in ``extra_body``): exactly one of ``json`` (a schema, or its JSON
    text), ``regex`` (the whole answer matches it), ``choice`` (the answer is one of the strings), ``grammar`` (a
    Lark grammar, as vLLM's guidance backend reads it) or ``json_object`` true; ``whitespace_pattern`` (a regex)
    is the whitespace a JSON format allows between its tokens (none by default, so vLLM's
    ``disable_any_whitespace`` is taken either way: true asks for what this server writes anyway, false allows
    whitespace the answer need not use); ``disable_additional_properties`` closes the schema's objects that do not
    say whether they take more properties (``additionalProperties: false``, as vLLM does). vLLM's
    ``structural_tag`` is refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_: Union[dict, str, None] = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1)
    choice: list[str] | None = Field(None, min_length=1, max_length=4096)
    grammar: str | None = Field(None, min_length=1)
    json_object: bool | None = None
    whitespace_pattern: str | None = Field(None, min_length=1)
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    structural_tag: Union[str, dict, None] = None

    @field_validator("structural_tag")
    @classmethod
    def _no_tags(cls, value: Any) -> Any:
        return _off(value, "structural_tag", (None,), "this server follows json, regex, choice, grammar and "
                    "json_object formats; a tool call's format is read from the chat template")

    @model_validator(mode="after")
    def _one(self) -> "StructuredOutputs":
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, "json_" if k == "json" else k)
                 is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of json, regex, choice, grammar, json_object; got "
                             f"{', '.join(given) or 'none'}")
        self.json_ = json_schema_value(self.json_, "structured_outputs json")
        if self.disable_additional_properties and self.json_ is not None:
            self.json_ = closed_objects(self.json_)
        if self.whitespace_pattern is not None and given[0] not in ("json", "json_object"):
            raise ValueError(f"structured_outputs whitespace_pattern applies to JSON formats only (json, json_object),"
                             f" not {given[0]}")
        return self

    def spec(self) -> tuple[str, Any, str, str | None]:
        """(kind, value, name, whitespace pattern or None) as structured.compile_format takes them."""
        if self.json_ is not None:
            return "json_schema", self.json_, "json", self.whitespace_pattern
        if self.json_object:
            return "json_object", None, "json_object", self.whitespace_pattern
        kind = next(k for k in ("regex", "choice", "grammar") if getattr(self, k) is not None)
        return kind, getattr(self, kind), kind, None


class Prediction(_Strict):
    """OpenAI's predicted output: text the answer is expected to resemble, a hint for its speed alone."""

    type: Literal["content"]
    content: Union[str, list[TextPart]]


MODERATION_WHY = "this server runs no moderation model; moderate the input and answer with a model of your own"


def effort_options(effort: str | None, template_kwargs: dict | None) -> dict:
    """A request's reasoning effort as vLLM hands it to the chat template: ``reasoning_effort`` itself (gpt-oss's
    template writes it), and ``enable_thinking`` (Qwen3's, Gemma's) false for "none", true for any other effort,
    unless the request's chat_template_kwargs set enable_thinking. Templates that read neither are unchanged."""
    if effort is None:
        return {}
    options = {"reasoning_effort": effort}
    if "enable_thinking" not in (template_kwargs or {}):
        options["enable_thinking"] = effort != "none"
    return options


def check_metadata(value: dict | None) -> dict | None:
    """``metadata`` within OpenAI's limits: 16 pairs, keys of at most 64 characters, values of at most 512."""
    if value is not None and (len(value) > MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
        raise ValueError(f"metadata takes at most {MAX_METADATA} pairs, keys of at most 64 characters and values "
                         "of at most 512")
    return value


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    # "auto" (the default with tools), "none", "required", a named function (tool_calls.forced_prefix) or
    # allowed_tools (the calls restricted to some of the tools, all of them still in the prompt: tool_names.py)
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None  # false: only an answer's first call is returned
    # OpenAI fields at their "off" values, as client libraries send them
    functions: list | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension (extra_body): json, regex, choice, grammar
    store: bool | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    function_call: Union[str, dict, None] = None  # the legacy tool_choice
    # as vLLM: the chat template reads it (gpt-oss's "Reasoning: low"), and "none" or another effort sets its
    # enable_thinking (Qwen3's) unless chat_template_kwargs does
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    # vLLM's: false leaves the reasoning block's text out of the answer (no reasoning_content)
    include_reasoning: bool = True
    verbosity: Literal["low", "medium", "high"] | None = None  # "medium": OpenAI's default
    web_search_options: dict | None = None
    # OpenAI fields that change no answer, taken as /v1/responses takes its own: labels, a billing hint, a cache
    # hint, and a predicted output (which only speeds OpenAI's answer up, never changes it)
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: CacheOptions | None = None
    prediction: Prediction | None = None
    moderation: dict | None = None  # OpenAI's moderation model on the input and answer: refused (none here)
    # vLLM's: special tokens (BOS) added on top of what the chat template writes (its default: none)
    add_special_tokens: bool = False
    # vLLM's: the prompt as the chat template rendered it, on the answer (streamed: its first chunk)
    return_prompt_text: bool = False
    # vLLM's options of a multimodal model's processor and media readers: empty only (text models here)
    mm_processor_kwargs: dict | None = None
    media_io_kwargs: dict | None = None
    # vLLM's extension: options of the model's chat template, e.g. {"enable_thinking": false} for Qwen3
    chat_template_kwargs: dict | None = None
    # vLLM's chat rendering fields (extra_body): the template's generation prompt (false: none), an answer that
    # continues the last (assistant) message, that message's text at the answer's start, RAG documents for the
    # templates that read them, and a template of the request's own (only with --trust-request-chat-template)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    documents: list[dict[str, str]] | None = Field(None, max_length=MAX_DOCUMENTS)
    chat_template: str | None = Field(None, min_length=1, max_length=MAX_TEMPLATE_CHARS)

    @model_validator(mode="after")
    def _generation_prompt(self):
        """vLLM's rules: continue_final_message goes without a generation prompt, and continues the last message,
        which must be the assistant's (here: a prompt that ends inside another role's turn has no answer to read)."""
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("cannot set both continue_final_message and add_generation_prompt to true; send "
                             "add_generation_prompt: false with continue_final_message: true")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError(f"continue_final_message continues the last message, which must be the assistant's "
                             f"(it is {self.messages[-1].role!r}); end messages with the answer's start")
        if self.continue_final_message and self.forced_call() is not None:
            raise ValueError("continue_final_message cannot be combined with a tool_choice that forces a call (the "
                             "answer would start with the call, not continue the message)")
        if self.chat_template is not None and self.tools:
            raise ValueError("a request's chat_template cannot be combined with tools on this server (the tool-call "
                             "format is read from the model's own template); leave one out")
        return self

    def render_options(self) -> dict:
        """The template's keywords from these fields (beside chat_template_kwargs, which may not name them; its
        reasoning_effort and enable_thinking yield to the request's reasoning_effort: ``effort_options``)."""
        options: dict[str, Any] = {"add_generation_prompt": self.add_generation_prompt,
                                   **effort_options(self.reasoning_effort, self.chat_template_kwargs)}
        if self.continue_final_message:
            options["continue_final_message"] = True
        if self.documents is not None:
            options["documents"] = self.documents
        if self.chat_template is not None:
            options["chat_template"] = self.chat_template
        return options

    def echoed(self) -> str | None:
        """With echo, the text the answer starts with (vLLM's rule): the last message's when it is the answer's
        role (the assistant's: continued, or followed by a generation prompt), else nothing."""
        if not self.echo or self.messages[-1].role != "assistant":
            return None
        return self.messages[-1].text()

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict | None) -> dict | None:
        return check_metadata(value)

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, value: dict | None) -> dict | None:
        return _off(value, "audio", (None,), "only text; the answer has no audio")

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: Any) -> Any:
        return _off(value, "function_call", ("none", "auto"), "the legacy function calling; send tools and "
                    "tool_choice")

    @field_validator("moderation")
    @classmethod
    def _no_moderation(cls, value: dict | None) -> dict | None:
        return _off(value, "moderation", (None,), MODERATION_WHY)

    @field_validator("mm_processor_kwargs", "media_io_kwargs")
    @classmethod
    def _text_model(cls, value: dict | None, info) -> dict | None:
        return _off(value or None, info.field_name, (None,), "this server serves text models, whose messages hold "
                    "text parts only")

    @field_validator("verbosity")
    @classmethod
    def _no_verbosity(cls, value: str | None) -> str | None:
        return _off(value, f"verbosity {value!r}", ("medium",), "the model writes as long as it writes")

    @field_validator("web_search_options")
    @classmethod
    def _no_search(cls, value: dict | None) -> dict | None:
        return _off(value, "web_search_options", (None,), "this server runs no hosted tools")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_options(cls, value: dict | None) -> dict | None:
        return _template_kwargs(value, ("add_generation_prompt", "continue_final_message", "documents", "chat_template"))

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info) -> int | None:
        """Without logprobs the answer has none: top_logprobs alone was dropped silently (OpenAI refuses it; 0, an
        "off" value clients send, passes)."""
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true; send both")
        return value

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: list | None) -> list | None:
        return _off(value, "functions", ([],), "the legacy function calling; send them as tools")

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        """OpenAI's custom tools (``{"type": "custom", "custom": {...}}``: free-form text input, maybe a grammar)
        are refused by kind, not as a type mismatch."""
        for index, tool in enumerate(value if isinstance(value, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "function":
                raise ValueError(f"tools[{index}] is a {kind[:40]!r} tool; only function tools are supported (this "
                                 "server reads calls as the chat template writes them: a name and JSON arguments)")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: list | None) -> list | None:
        return unique_tools(value, [tool.function.name for tool in value or ()])

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any, info) -> Any:
        """"auto", "none", "required" (some call) or ``{"type": "function", "function": {"name": ...}}`` (that
        one): the last two need tools, and a named function must be one of them."""
        if value is None or value in ("none", "auto"):
            return value
        if allowed_tools(value, chat=True) is not None:  # the functions the answer may call (tool_names.NameGate)
            return check_allowed(value, True, [tool.function.name for tool in info.data.get("tools") or ()])
        function = value.get("function") if isinstance(value, dict) else None
        named = isinstance(function, dict) and value.get("type") == "function" and set(value) == {"type", "function"} \
            and set(function) == {"name"} and isinstance(function["name"], str)
        return forced_tool_choice(value, function["name"] if named else None,
                                  [tool.function.name for tool in info.data.get("tools") or ()],
                                  "{'type': 'function', 'function': {'name': NAME}}, or allowed_tools "
                                  "({'type': 'allowed_tools', 'allowed_tools': {'mode': ..., 'tools': [...]}})")

    def forced_call(self) -> str | None:
        """The function the answer must call (tool_choice names one), "" for any ("required"), None: not forced
        (:func:`choice_forces`)."""
        return choice_forces(self.tool_choice, chat=True)

    def callable_names(self) -> set[str]:
        """The functions the answer's calls may name (all the tools, or allowed_tools' only)."""
        return callable_names(self.tool_choice, True, [tool.function.name for tool in self.tools or ()])

    def gated_names(self) -> list[str] | None:
        """allowed_tools' functions where a call's name is restricted to them as it is written (:func:`gated_names`)."""
        return gated_names(self.tool_choice, True, [tool.function.name for tool in self.tools or ()])

    def openai_tools(self) -> list[dict] | None:
        """The tools as chat templates read them (OpenAI's form, fields left out where not sent)."""
        if not self.tools:
            return None
        return [{"type": "function", "function": tool.function.model_dump(exclude_none=True)} for tool in self.tools]

    def calls_parsed(self) -> bool:
        """Whether the answer's calls are read out of its text: tools given and tool_choice not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    @field_validator("store")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        return _off(value, "store=true", (False,), "this server keeps no answers")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list | None) -> list | None:
        return _off(value, f"modalities {value!r}"[:60], (["text"],), "only text")


class AdapterRequest(_Strict):
    name: str


# -- the Responses API (POST /v1/responses) ----------------------------------------------------------------------
MAX_METADATA = 16  # OpenAI's limits: 16 pairs, keys of at most 64 characters, values of at most 512


class InputText(_Strict):
    """A text part of an input message: ``input_text``, or ``output_text`` (an earlier answer's part sent back,
    with its annotations and logprobs, which the chat template never shows)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list | None = None
    logprobs: list | None = None
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class InputMessage(_Strict):
    """A message item of ``input``; ``id``, ``status`` and ``phase`` are what an earlier answer's output item holds
    when a client appends it to its history (they change nothing)."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[InputText]]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts ({'type': 'input_text', 'text': ...})")
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text"):
                shown = repr(kind)[:40] if kind is not None else type(part).__name__
                raise ValueError(f"only text content parts (input_text, output_text) are supported, got a part of "
                                 f"type {shown}")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class TextFormat(_Strict):
    """The Responses API's ``text.format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or the flat
    ``{"type": "json_schema", "name", "schema", "strict"}`` the openai package sends."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    type: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        return _format_type(value)

    @model_validator(mode="after")
    def _schema_given(self) -> "TextFormat":
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs its name and schema: {'type': 'json_schema', 'name': ..., "
                             "'schema': {...}}")
        if self.type != "json_schema" and (self.name is not None or self.schema_ is not None):
            raise ValueError("name and schema go with type 'json_schema' only")
        return self

    def spec(self) -> tuple[str, dict | None, str] | None:
        """(type, schema, name) of a JSON format; None for plain text."""
        if self.type == "text":
            return None
        return self.type, self.schema_, self.name or self.type


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("verbosity")
    @classmethod
    def _no_verbosity(cls, value: str | None) -> str | None:
        return _off(value, f"verbosity {value!r}", ("medium",), "the model's length is set by max_output_tokens")


class ResponsesStreamOptions(_Strict):
    include_obfuscation: bool = True  # OpenAI pads events against side channels; lorakit sends no padding field


class FunctionCallItem(_Strict):
    """An earlier answer's ``function_call`` output item sent back in ``input`` (the openai package's
    ``model_dump()`` of it holds the ``async_``, ``caller`` and ``namespace`` keys too, null)."""

    model_config = ConfigDict(populate_by_name=True)  # ``async`` (the wire name) or ``async_`` (model_dump's)

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    async_: None = Field(None, alias="async")
    caller: None = None
    namespace: None = None

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            return CallFunction._json_object(value)
        except ValueError as error:
            raise ValueError(f"a function_call's {error}") from None

    def parsed_arguments(self) -> dict:
        return CallFunction(name=self.name, arguments=self.arguments).parsed_arguments()


class FunctionCallOutputItem(_Strict):
    """A tool's result: ``{"type": "function_call_output", "call_id", "output"}`` (text, or input_text parts)."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: Union[str, list[InputText]]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    name: str | None = None
    caller: None = None
    namespace: None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class ReasoningPart(_Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Strict):
    """An earlier answer's ``reasoning`` output item sent back: its text goes to the next assistant turn's
    ``reasoning_content``, which the chat template writes or drops as it does in a chat."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningPart] = []
    content: list[ReasoningPart] | None = None
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        return "".join(part.text for part in (self.content or self.summary))


def _item_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    # tag names hold "[": transport's error param leaves union members' names out (``input.0.content``)
    return f"item[{kind or 'message'}]"


InputItem = Annotated[Union[Annotated[InputMessage, Tag("item[message]")],
                            Annotated[FunctionCallItem, Tag("item[function_call]")],
                            Annotated[FunctionCallOutputItem, Tag("item[function_call_output]")],
                            Annotated[ReasoningItem, Tag("item[reasoning]")]], Discriminator(_item_kind)]
INPUT_ITEMS = ("message", "function_call", "function_call_output", "reasoning")


class ReasoningOptions(_Strict):
    """The Responses API's ``reasoning``: ``effort`` goes to the chat template as chat's reasoning_effort does
    (vLLM's reading); a summary is accepted and not written (the reasoning item carries the reasoning's own
    text)."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


LOGPROBS_INCLUDE = "message.output_text.logprobs"  # the include that asks for the answer's logprobs


class ResponsesFunctionTool(_Strict):
    """A Responses API function tool: flat, ``{"type": "function", "name", "description", "parameters"}``."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # accepted as on chat completions (no constrained decoding)


class ResponsesRequest(_VllmSampling):
    """OpenAI's Responses API request, the subset vLLM also serves: ``input`` is a string (one user message) or
    items (messages; an agent's ``function_call`` / ``function_call_output`` / ``reasoning`` items),
    ``instructions`` a system message put first, ``tools`` function tools. Nothing is stored, so what needs a
    stored response (``previous_response_id``, ``conversation``, ``background``) is refused by name, as are
    hosted tools (web_search, file_search, ...) and reasoning controls; ``text.format`` may ask for JSON."""

    model: str
    input: list[InputItem]
    instructions: str | None = None
    # OpenAI's minimum: fewer tokens than 16 is refused there too
    max_output_tokens: int | None = Field(None, ge=16)
    temperature: float = _finite(1.0, ge=0.0, le=2.0)
    top_p: float = _finite(1.0, ge=0.0, le=1.0)  # 0 (OpenAI takes it): the most likely token only
    top_k: int = Field(0, ge=-1)  # vLLM's extension here too (its Responses API takes it); -1, 0: off
    stream: bool = False
    stream_options: ResponsesStreamOptions | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None  # a billing hint
    prompt_cache_options: CacheOptions | None = None  # a hint for OpenAI's prompt cache: no effect
    moderation: dict | None = None  # refused: no moderation model here
    image: dict | None = None  # options for input images, which this server takes none of: no effect
    # OpenAI's account programs, background windows and server-side compaction: empty only
    access_programs: dict | None = None
    background_options: dict | None = None
    context_management: list | None = None
    store: bool | None = None  # accepted either way; nothing is stored (the answer says "store": false)
    text: TextConfig | None = None
    tools: list[ResponsesFunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    # "auto" (the default with tools), "none", "required", a named function (tool_calls.forced_prefix) or
    # allowed_tools (the calls restricted to some of the tools, all of them still in the prompt: tool_names.py)
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None  # false: only an answer's first call is returned
    # vLLM's extension, as on chat completions: options of the chat template, e.g. {"enable_thinking": false}
    chat_template_kwargs: dict | None = None
    # fields at their "off" values, as client libraries (the Agents SDK, LangChain) send them
    previous_response_id: str | None = None
    conversation: Union[str, dict, None] = None
    prompt: dict | None = None
    background: bool | None = None
    reasoning: ReasoningOptions | None = None
    max_tool_calls: int | None = None
    truncation: str | None = None
    include: list | None = None
    # the answer's logprobs (with include "message.output_text.logprobs"): the top_logprobs likeliest tokens at each
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        """A string is one user message; a list holds message, function_call, function_call_output and reasoning
        items (a message's ``type`` may be left out)."""
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if not isinstance(value, list):
            raise ValueError("input must be a string or a list of message items ({'role': 'user', 'content': ...})")
        if not value:
            raise ValueError("input is empty")
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise ValueError(f"input[{index}] must be an item (an object), got {type(item).__name__}")
            kind = item.get("type")
            if kind is not None and kind not in INPUT_ITEMS:
                raise ValueError(f"input[{index}] is an item of type {str(kind)[:40]!r}; only {', '.join(INPUT_ITEMS)} "
                                 "items are supported (no hosted tools on this server)")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        if isinstance(value, list):
            for index, tool in enumerate(value):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if isinstance(kind, str) and kind != "function":
                    raise ValueError(f"tools[{index}] is a {kind[:40]!r} tool; only function tools are supported (this "
                                     "server runs no hosted tools: web_search, file_search, code_interpreter, ...)")
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: list | None) -> list | None:
        return unique_tools(value, [tool.name for tool in value or ()])

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any, info) -> Any:
        """"auto", "none", "required" (some call) or ``{"type": "function", "name": ...}`` (that one; the Responses
        form): the last two need tools, and a named function must be one of them."""
        if value is None or value in ("none", "auto"):
            return value
        if allowed_tools(value, chat=False) is not None:  # the functions the answer may call (tool_names.NameGate)
            return check_allowed(value, False, [tool.name for tool in info.data.get("tools") or ()])
        named = isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "name"} \
            and isinstance(value["name"], str)
        return forced_tool_choice(value, value["name"] if named else None,
                                  [tool.name for tool in info.data.get("tools") or ()],
                                  "{'type': 'function', 'name': NAME} or {'type': 'allowed_tools', 'mode': ..., "
                                  "'tools': [...]} (this server runs no hosted tools)")

    def forced_call(self) -> str | None:
        """The function the answer must call (tool_choice names one), "" for any ("required"), None: not forced
        (:func:`choice_forces`)."""
        return choice_forces(self.tool_choice, chat=False)

    def callable_names(self) -> set[str]:
        """The functions the answer's calls may name (all the tools, or allowed_tools' only)."""
        return callable_names(self.tool_choice, False, [tool.name for tool in self.tools or ()])

    def gated_names(self) -> list[str] | None:
        """allowed_tools' functions where a call's name is restricted to them as it is written (:func:`gated_names`)."""
        return gated_names(self.tool_choice, False, [tool.name for tool in self.tools or ()])

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_options(cls, value: dict | None) -> dict | None:
        return _template_kwargs(value)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict | None) -> dict | None:
        return check_metadata(value)

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, value: Any, info) -> Any:
        return _stream_options(value, info)

    @field_validator("previous_response_id", "conversation", "prompt")
    @classmethod
    def _nothing_stored(cls, value: Any, info) -> Any:
        return _off(value, info.field_name, (None,), "this server stores no responses, conversations or prompts; "
                    "send the whole conversation in input")

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        return _off(value, "background=true", (False,), "this server stores no responses to fetch later")

    @field_validator("moderation")
    @classmethod
    def _no_moderation(cls, value: dict | None) -> dict | None:
        return _off(value, "moderation", (None,), MODERATION_WHY)

    @field_validator("access_programs", "background_options", "context_management")
    @classmethod
    def _openai_only(cls, value: Any, info) -> Any:
        why = {"access_programs": "OpenAI's access programs do not apply to this server",
               "background_options": "background responses are not run here (nothing is stored to fetch later)",
               "context_management": "the input is never compacted: one over the context is refused"}
        return _off(value or None, info.field_name, (None,), why[info.field_name])

    def template_options(self) -> dict | None:
        """The chat template's keywords: chat_template_kwargs, and ``reasoning.effort`` as chat's reasoning_effort
        (``effort_options``)."""
        effort = effort_options(self.reasoning.effort if self.reasoning is not None else None,
                                self.chat_template_kwargs)
        return {**(self.chat_template_kwargs or {}), **effort} or None

    @field_validator("max_tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: int | None) -> int | None:
        return _off(value, "max_tool_calls", (None,), "send parallel_tool_calls false for one call per answer")

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        return _off(value, f"truncation {str(value)[:40]!r}", ("disabled",),
                    "an input over the context is refused, never cut")

    @field_validator("include")
    @classmethod
    def _no_include(cls, value: list | None) -> list | None:
        # the Agents SDK and Codex ask for reasoning.encrypted_content when nothing is stored: the reasoning items
        # carry their text in plain, so there is nothing more to include
        served = ("reasoning.encrypted_content", LOGPROBS_INCLUDE)
        if value is not None and any(v not in served for v in value):
            raise ValueError(f"include {str(value)[:60]} is not supported (the output data served: "
                             f"{', '.join(served)}); leave the others out")
        return value

    def logprobs_count(self) -> int | None:
        """How many likeliest tokens the answer's logprobs list at each token (OpenAI's top_logprobs, 0: the
        token's own only), or None when the include does not ask for logprobs (top_logprobs alone returns none,
        as OpenAI's)."""
        return (self.top_logprobs or 0) if LOGPROBS_INCLUDE in (self.include or ()) else None

    def chat_tools(self) -> list[dict] | None:
        """The tools in the chat form templates read (``{"type": "function", "function": {...}}``)."""
        if not self.tools:
            return None
        return [{"type": "function", "function": tool.model_dump(exclude_none=True, exclude={"type", "strict"})}
                for tool in self.tools]

    def calls_parsed(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def has_tool_items(self) -> bool:
        return any(isinstance(item, (FunctionCallItem, FunctionCallOutputItem)) for item in self.input)

    def messages(self) -> list[dict]:
        """The chat-template messages, as chat completions render them (``tool_calls.template_messages``):
        ``instructions`` first as a system message, developer read as system; an answer's message and the
        ``function_call`` items right after it are one assistant turn (content, then calls with dict arguments);
        a ``function_call_output`` is a ``tool`` turn; a ``reasoning`` item's text is the next assistant turn's
        ``reasoning_content``."""
        messages: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        names: dict[str, str] = {}
        reasoning, previous = None, None
        for item in self.input:
            if isinstance(item, ReasoningItem):
                reasoning = (reasoning or "") + item.text()
            elif isinstance(item, InputMessage):
                entry = {"role": item.role if item.role != "developer" else "system", "content": item.text()}
                if item.role == "assistant" and reasoning:
                    entry["reasoning_content"], reasoning = reasoning, None
                messages.append(entry)
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.parsed_arguments()}}
                names[item.call_id] = item.name
                if isinstance(previous, (FunctionCallItem, InputMessage)) and messages[-1]["role"] == "assistant":
                    messages[-1].setdefault("tool_calls", []).append(call)  # the same turn: its text, then its calls
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                    if reasoning:
                        messages[-1]["reasoning_content"], reasoning = reasoning, None
            else:
                entry = {"role": "tool", "tool_call_id": item.call_id, "content": item.text()}
                name = item.name or names.get(item.call_id)
                if name:
                    entry["name"] = name
                messages.append(entry)
            previous = item
        return messages
