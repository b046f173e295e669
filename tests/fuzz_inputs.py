"""A small seeded mutator of JSON values, bytes and text lines, for the fuzz tests (no hypothesis: it is no dependency).

Every function takes a ``random.Random``: a fixed seed gives the same inputs on every machine and Python version
(only ``Random``'s documented methods are used), so a failure found once can be replayed from its seed.

- ``mutate_json(value, rng)``: one hostile change at a random place of a JSON value (wrong type, junk number, lone
  surrogate, NUL, long string, deep nesting, empty list, unknown key, key removed, ...); returns ``(new, path)``.
- ``dumps(value, rng)``: JSON text that Python's json accepts, sometimes with NaN / Infinity, a duplicated key or
  odd whitespace (what ``json.dumps`` never writes but clients may send).
- ``mutate_bytes(data, rng)``: one byte-level change (flip, cut, insert, overwrite a run).
- ``mutate_line(line, rng)``: one change to a text line of a data file (BOM, CRLF, NUL, invalid UTF-8, ...).
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

NESTED = 200  # deep enough to break naive recursion in a validator, shallow enough for json's own parser

# values that break code expecting another type: each is a callable of the Random, so large ones are built lazily
JUNK = [
    lambda r: None, lambda r: True, lambda r: False, lambda r: 0, lambda r: -1, lambda r: 1,
    lambda r: 2**31, lambda r: 2**63, lambda r: 2**64, lambda r: -(2**63) - 1, lambda r: 10**30,
    lambda r: 0.5, lambda r: -0.0, lambda r: 1e308, lambda r: -1e308, lambda r: 5e-324,
    lambda r: math.nan, lambda r: math.inf, lambda r: -math.inf,
    lambda r: "", lambda r: " ", lambda r: "0", lambda r: "-1", lambda r: "true", lambda r: "null",
    lambda r: "\x00", lambda r: "a\x00b", lambda r: "\ud800", lambda r: "x\udfffy", lambda r: "\U0001f642" * 3,
    lambda r: "\u202e\u200b", lambda r: "x" * r.choice([300, 5000, 100_000]), lambda r: "{" * 50,
    lambda r: "<|im_start|>system\nhi<|im_end|>", lambda r: "{{ 7*7 }}{% for x in y %}",
    lambda r: [], lambda r: {}, lambda r: [None], lambda r: [[]], lambda r: [{}], lambda r: {"": None},
    lambda r: [1, "a", None, 2.5, [], {}], lambda r: {"type": "text", "text": 5}, lambda r: {"a": [{"b": {}}]},
    lambda r: _nested(r.choice([10, NESTED]), r.choice(["list", "dict"])),
    lambda r: [r.randrange(-5, 400) for _ in range(r.choice([1, 3, 50]))],
    lambda r: ["x"] * r.choice([17, 65, 300]),
    lambda r: {str(i): r.choice([-100, 0, 100, 1e9, "x", None]) for i in range(r.choice([1, 3, 400]))},
]


# renamed keys: what a key's spelling breaks (pydantic's own location names, separators, case, length)
KEYS = [lambda k: "", lambda k: "str", lambda k: "list[str]", lambda k: k + "[0]", lambda k: k.upper(),
        lambda k: k + "\x00", lambda k: " " + k, lambda k: k + "." + k, lambda k: "\ud800", lambda k: k * 2000,
        lambda k: "__class__", lambda k: "0"]


# values of a field's own type at the edges of what it may mean (ids past a tiny vocabulary, special tokens' text,
# regular expressions and JSON of odd shapes), so a mutation gets past the type checks into the code behind them
EDGES = {
    int: [lambda r: 0, lambda r: 1, lambda r: -1, lambda r: 16, lambda r: 17, lambda r: 20, lambda r: 21,
          lambda r: r.randrange(0, 400), lambda r: 2**31 - 1, lambda r: 10**6],
    float: [lambda r: 0.0, lambda r: 1e-300, lambda r: 2.0, lambda r: 1.999999, lambda r: -2.0, lambda r: 100.0,
            lambda r: r.random()],
    str: [lambda r: "", lambda r: " ", lambda r: "\n", lambda r: "<|im_end|>", lambda r: "<|endoftext|>",
          lambda r: "<tool_call>", lambda r: "</tool_call>", lambda r: "\ufffd", lambda r: "\U0001f642",
          lambda r: "(a|a)*b", lambda r: "[", lambda r: "\\", lambda r: "a{1,100000}", lambda r: ".*",
          lambda r: '{"type": "object"}', lambda r: "{}", lambda r: "start: x*", lambda r: "x" * r.choice([255, 257]),
          lambda r: r.choice(["user", "assistant", "system", "tool", "developer", "function", "json_schema",
                              "json_object", "text", "function_call", "input_text", "auto", "none", "required"])],
    bool: [lambda r: True, lambda r: False],
    list: [lambda r: [], lambda r: [""], lambda r: [0] * 17, lambda r: list(range(300, 380)),
           lambda r: [{"role": "user", "content": "x"}] * r.choice([1, 70]), lambda r: ["a", "a"]],
    dict: [lambda r: {}, lambda r: {"type": "object", "properties": {"a": {"$ref": "#"}}},
           lambda r: {"type": "string", "pattern": "(a|a)*b"}, lambda r: {"anyOf": []},
           lambda r: {str(t): -100 for t in range(r.choice([1, 300]))}, lambda r: {"359": 100, "0": -100}],
}


def _nested(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def junk(rng: random.Random) -> Any:
    """One hostile JSON value."""
    return rng.choice(JUNK)(rng)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in ``value`` (the root is ``()``), keys and list indices."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, prefix + (index,))
    return found


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _get(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def mutate_json(value: Any, rng: random.Random, *, fields: list[str] | tuple[str, ...] = ()) -> tuple[Any, tuple]:
    """``value`` (a copy) with one hostile change at a random place; returns it and the place's path. ``fields``:
    names worth adding as unknown-to-this-request keys (other endpoints' fields)."""
    value = _copy(value)
    path = rng.choice(_paths(value))
    target = _get(value, path)
    kind = rng.random()
    if not path and isinstance(value, dict) and kind < 0.15:  # a known field of another endpoint, or an unknown one
        key = rng.choice(list(fields) or ["zzz"]) if rng.random() < 0.7 else rng.choice(["zzz", "", "\x00", "model "])
        value[key] = junk(rng)
        return value, (key,)
    if not path:
        return junk(rng), path  # the whole body: no object at all
    if kind > 0.7 and type(target) in EDGES:  # a value of the right type at an edge: gets past type checks, deeper
        parent = _get(value, path[:-1])
        parent[path[-1]] = rng.choice(EDGES[type(target)])(rng)
        return value, path
    if kind < 0.55:
        new = junk(rng)
    elif kind < 0.65:
        new = [target]  # the right value wrapped in a list
    elif kind < 0.75 and isinstance(target, str):
        new = rng.choice([target * 1000, target + "\x00", target.upper(), target[::-1], target + "\ud800",
                          " " + target])
    elif kind < 0.85 and isinstance(target, (int, float)) and not isinstance(target, bool) and math.isfinite(target):
        new = rng.choice([-target, target * 10**6, target + 0.5, str(target), -(10**20), int(target) + 10**9])
    elif kind < 0.92 and isinstance(target, dict) and target:
        key = rng.choice(list(target))
        item = target.pop(key)  # a required key removed, or renamed to a key no field has
        if rng.random() < 0.5:
            target[rng.choice(KEYS)(key)] = item
        return value, path
    elif isinstance(target, list) and target:
        new = rng.choice([[], target * rng.choice([2, 100]), target[::-1], target + [junk(rng)]])
    else:
        new = junk(rng)
    parent = _get(value, path[:-1])
    if isinstance(parent, dict) and rng.random() < 0.05:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return value, path


def dumps(value: Any, rng: random.Random) -> str:
    """JSON text of ``value``, written the odd ways clients do: NaN / Infinity as Python's json writes them,
    sometimes a key duplicated (the last one counts in Python's parser) or unusual whitespace."""
    text = json.dumps(value, allow_nan=True, ensure_ascii=rng.random() < 0.8)
    if isinstance(value, dict) and value and rng.random() < 0.15:
        key = rng.choice(list(value))
        text = "{" + json.dumps(key) + ": " + json.dumps(junk(rng), allow_nan=True) + ", " + text[1:]
    if rng.random() < 0.05:
        text = "\ufeff" + text if rng.random() < 0.5 else " \t\r\n" + text + "\n\n"
    return text


def mutate_bytes(data: bytes, rng: random.Random, *, within: int | None = None) -> bytes:
    """One byte-level change to ``data`` (at an offset below ``within`` where given, e.g. a file's header)."""
    end = min(len(data), within) if within else len(data)
    at = rng.randrange(max(1, end))
    kind = rng.randrange(6)
    if kind == 0:  # flip bits
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:] if data else b"\x00"
    if kind == 1:  # cut the rest
        return data[:at]
    if kind == 2:  # insert junk
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 64]))) + data[at:]
    if kind == 3:  # overwrite a run with one byte value
        length = rng.choice([1, 8, 32])
        return data[:at] + bytes([rng.choice([0, 0xFF, 0x22, 0x7B, 0x80])]) * length + data[at + length:]
    if kind == 4:  # drop a run
        return data[:at] + data[at + rng.choice([1, 8, 100]):]
    return data + data[:rng.choice([1, 100, len(data)])]  # trailing bytes


def mutate_line(line: str, rng: random.Random) -> bytes:
    """One change to one line of a text data file, as UTF-8 bytes (some not valid UTF-8)."""
    raw = line.encode("utf-8")
    kind = rng.randrange(10)
    if kind == 0:
        return b"\xef\xbb\xbf" + raw  # a byte order mark (in the middle of a file, not only its start)
    if kind == 1:
        return raw + b"\r"  # CRLF once joined with "\n"
    if kind == 2:
        at = rng.randrange(len(raw) + 1)
        return raw[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]) + raw[at:]  # invalid UTF-8
    if kind == 3:
        return raw.replace(b":", b":\x00", 1)
    if kind == 4:
        return raw[: rng.randrange(len(raw) + 1)]  # a line cut short
    if kind == 5:
        return raw * rng.choice([2, 1000])  # two records on one line, or a giant line
    if kind == 6:
        return b"\x00" * rng.choice([1, 100])
    if kind == 7:
        return rng.choice([b"", b" ", b"\t", b"null", b"[]", b"{}", b"1", b'"x"', b"\xef\xbb\xbf"])
    if kind == 8:
        return raw.replace(b'"', b"'")  # Python's repr of a dict, not JSON
    return mutate_bytes(raw, rng)
