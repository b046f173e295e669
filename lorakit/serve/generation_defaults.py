"""``--generation-config``: the sampling defaults of requests that leave a field out, as vLLM's option of that name.

'auto' (vLLM's default): the model's ``generation_config.json`` values of temperature, top_p, top_k, min_p and
repetition_penalty (what its authors recommend: Qwen3 0.6 / 0.95 / 20, Llama 3 0.6 / 0.9) are what a request gets
for the fields it does not send; 'vllm': OpenAI's neutral defaults (temperature 1, top_p 1, no top_k / min_p /
repetition penalty), whatever the model says.

vLLM's reading (``ModelConfig.get_diff_sampling_param``), mirrored: the fields ``GenerationConfig.to_diff_dict``
gives (those differing from transformers' defaults), whatever ``do_sample`` says (a file of ``do_sample: false``
and a temperature still sets that temperature), the same for every adapter. The model's ``generation_config`` is
the one ``load_base`` read (``loading.checked_generation_config`` dropped wrongly typed values); a value outside
what a request may send (a temperature of 3) is left out and said at start.
"""

from __future__ import annotations

import math

CHOICES = ("auto", "vllm")

# the sampling fields vLLM takes from the file, with the range a request's own value must be in
# (lorakit.serve.protocol's bounds): (is it valid, what it must be)
_BOUNDS = {
    "temperature": (lambda v: 0 <= v <= 2, "a number from 0 to 2"),
    "top_p": (lambda v: 0 < v <= 1, "a number above 0, at most 1"),
    "top_k": (lambda v: v >= -1 and float(v).is_integer(), "an integer of at least -1"),
    "min_p": (lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "repetition_penalty": (lambda v: v > 0, "a number above 0"),
}


def model_defaults(model, choice: str) -> tuple[dict, list[str]]:
    """``({field: value}, [why each file value was left out])`` for ``--generation-config choice`` and a model
    loaded by ``load_base`` (its ``generation_config``); ``({}, [])`` for 'vllm' or a model whose file sets none."""
    config = getattr(model, "generation_config", None) if choice == "auto" else None
    values = config.to_diff_dict() if config is not None else {}
    defaults, ignored = {}, []
    for name, (valid, must) in _BOUNDS.items():
        value = values.get(name)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number and valid(value)):
            ignored.append(f"{name} {value!r} is not {must}")
            continue
        defaults[name] = int(value) if name == "top_k" else float(value)  # the request's types (strict pydantic)
    return defaults, ignored


def startup_lines(defaults: dict, ignored: list[str]) -> list[str]:
    """What ``lorakit serve`` prints to stderr at start (vLLM logs its overridden defaults likewise)."""
    lines = []
    if defaults:
        said = ", ".join(f"{name}={value}" for name, value in defaults.items())
        lines.append(f"lorakit serve: default sampling parameters overridden by the model's generation_config.json "
                     f"(requests that leave them out get these): {said}; start with --generation-config vllm to keep "
                     "OpenAI's defaults")
    for why in ignored:
        lines.append(f"lorakit serve: the model's generation_config.json {why}, so it is not used as a default")
    return lines


def apply_defaults(body, defaults: dict) -> None:
    """Give ``body`` (a parsed request) the model's ``defaults`` for the fields the client did not send; a field
    sent as null was dropped before validation (``protocol._Strict``), so it is not in ``model_fields_set`` and
    gets the default too. Fields the request type does not have are skipped."""
    given = body.model_fields_set
    for name, value in defaults.items():
        if name not in given and name in type(body).model_fields:
            setattr(body, name, value)
