"""Request bodies of the OpenAI-compatible endpoints, and the OpenAI error body.

Unknown fields are refused (``extra="forbid"``), so a typo never silently changes a request. OpenAI fields that
lorakit does not implement are accepted only at their "off" value and otherwise refused by name. Types are strict,
as OpenAI's are: ``"max_tokens": "10"`` or ``true`` is refused, never read as 10 or 1 (a float field takes an int).
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _finite(default: float, **bounds) -> Any:
    return Field(default, allow_inf_nan=False, **bounds)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    temperature: float = _finite(1.0, ge=0.0, le=2.0)
    top_p: float = _finite(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # the range torch.Generator.manual_seed takes
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported; send several requests for several choices")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("presence/frequency penalties are not supported; leave them at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> list[str]:
        stops = [value] if isinstance(value, str) else value if isinstance(value, list) else [] if value is None else None
        if stops is None or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings of at most 256 characters")
        return stops


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """OpenAI's four prompt forms: a string, token ids, or a batch of either; a batch must hold one prompt."""
        if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
            if len(value) != 1:
                raise ValueError(f"only one prompt per request is supported, got {len(value)}; send one request per prompt")
            value = value[0]
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if not value:
                raise ValueError("prompt is empty")
            return value
        raise ValueError("prompt must be a string or a list of token ids (integers), or a list holding one of them")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of is not supported (leave it at 1)")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts ({'type': 'text', 'text': ...})")
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                shown = repr(kind)[:40] if kind is not None else type(part).__name__
                raise ValueError(f"only text content parts are supported, got a part of type {shown}")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class AdapterRequest(_Strict):
    name: str
