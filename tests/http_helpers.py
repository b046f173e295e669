"""HTTP helpers the server tests share: requests to a running ``lorakit serve``.

``server`` is a test module's server fixture: a dict whose "client" is an ``httpx.Client`` on the server's URL.
``post_json`` and ``sse_events`` send ``body`` over ``GREEDY`` (the served base model at temperature 0), so that a
test writes only the fields it is about; a field of ``body`` wins over the default. ``api_error`` reads an error
answer and checks the shape every client parses (OpenAI's four fields, a one-line message).
"""

from __future__ import annotations

import json

import httpx

GREEDY = {"model": "base", "temperature": 0}


def post_json(server: dict, path: str, body: dict, status: int = 200) -> dict:
    """The JSON answer to ``body`` POSTed to ``path``, after checking its HTTP status."""
    response = server["client"].post(path, json={**GREEDY, **body})
    assert response.status_code == status, response.text[:400]
    return response.json()


def sse_events(server: dict, path: str, body: dict) -> list[dict]:
    """The JSON of each ``data: {...}`` line of the answer streamed to ``body`` (``data: [DONE]`` left out)."""
    events = []
    with server["client"].stream("POST", path, json={**GREEDY, **body, "stream": True}) as response:
        assert response.status_code == 200, response.read()[:300]
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events


def api_error(response: httpx.Response, status: int) -> dict:
    """The ``error`` object of a refused request: ``status``, OpenAI's four fields, one line and no traceback."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    return error
