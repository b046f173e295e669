"""``lorakit serve`` under HTTP/1.1 edges a new client may hit, over raw sockets (one server for the module).

Each test holds a case that went wrong against a real server before its fix, and checks the server still answers
correctly on the same or a new connection afterwards:

- ``Expect: 100-continue`` answered with a final status before the body was read (the API key's 401, a 413 by
  Content-Length, an unknown route's 404): the connection stayed open waiting for a body the client, told no,
  never sends, so the client's next request on it was read as that body (it hung, or was cut into a 400);
- a request target in absolute form (``POST http://host/v1/completions``, which RFC 9112 says a server MUST accept)
  was a 404 "no route '/http://host/...'": uvicorn's h11 parser hands the whole URL on as the path;
- a request line or header over h11's 16 KiB limit, arriving in more than one packet (as any head that long does
  over a real network), was a 400 "malformed HTTP request ... needs a Host header, Content-Length ...": now a 431
  that says the head is too long; with httptools installed (uvicorn[standard]) such heads had no limit at all;
- a content part with a field missing or unknown (``cache_control``, which LiteLLM-style clients add) was refused
  as "messages.0.content: Input should be a valid string, got list [...]": pydantic's first error, for the union's
  string member; now the error inside the list of parts, naming the field;
- NaN or Infinity in a JSON schema (Python's reader takes them from a body): llguidance read them as null, so
  ``{"const": Infinity}`` forced every answer to ``null``, ``"maximum": NaN`` was "Expected f64, got null"; now
  a 400 that names them;
- a WebSocket upgrade (the openai package's realtime client: ``GET /v1/realtime``), where the ``websockets``
  package is installed, got uvicorn's bare 403 with no body instead of the OpenAI error body's 404.

The tests also pass with httptools and websockets importable by the server (``PYTHONPATH`` of a folder holding
them), the parser and WebSocket support ``uvicorn[standard]`` brings. The pipelining test passed as it was: a
guard that the middlewares above keep HTTP/1.1 pipelining (requests sent back to back on one connection, a stream
among them) answered in order.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from http_helpers import api_error
from test_serve_support import ServerProcess, make_adapter, never_ending, tiny_hf_folder

KEY = "http18-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = json.dumps({"model": "a0", "prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("http18")
    model_dir = tiny_hf_folder(root / "model", max_position_embeddings=512)
    base = never_ending(model_dir)  # greedy answers run to max_tokens
    for seed, name in enumerate(("a0", "a1"), start=1):
        make_adapter(base, root / "adapters" / name, seed=seed)
    proc = ServerProcess(model_dir, root / "adapters", "--max-tokens", "300", "--max-loaded", "2", api_key=KEY,
                         log=root / "server.log")
    client = httpx.Client(base_url=proc.url, headers=AUTH, timeout=60)
    try:
        yield {"url": proc.url, "port": proc.port, "client": client, "server": proc, "root": root}
    finally:
        client.close()
        proc.stop()


@pytest.fixture(scope="module")
def answer(server) -> str:
    """a0's greedy answer to BODY, for checks that the server still answers correctly."""
    response = server["client"].post("/v1/completions", content=BODY)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


# -- raw HTTP/1.1 over one socket -----------------------------------------------------------------------------------
def _request(method: str, target: str, body: bytes = b"", headers: dict | None = None, length: int | None = None,
             auth: bool = True) -> bytes:
    """One request's bytes: Host, the API key (``auth``), Content-Length ``length`` (default: the body's)."""
    fields = {"Host": "localhost", **(AUTH if auth else {}), **(headers or {})}
    if body or length is not None:
        fields.setdefault("Content-Length", str(len(body) if length is None else length))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode() + body


class Wire:
    """A client socket that reads whole HTTP/1.1 answers (by Content-Length; 1xx answers as they come)."""

    def __init__(self, port: int, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def answer(self) -> tuple[int, dict, bytes]:
        """The next answer: (status, headers with lower-case names, body)."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before an answer; got {self.buffer[:200]!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":  # a stream
            return status, headers, self._chunks()
        size = int(headers.get("content-length", 0))
        return status, headers, self._take(size)

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _chunks(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                if not self._fill():
                    raise ConnectionError("closed mid-stream")
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            body += self._take(size + 2)[:size]
            if size == 0:
                return body

    def closed(self, wait: float = 5) -> bool:
        """Whether the server closes the connection within ``wait`` seconds (sending nothing more)."""
        self.sock.settimeout(wait)
        try:
            return not self._fill()
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def _error(status: int, body: bytes, expected: int) -> dict:
    """The OpenAI error object of an answer of status ``expected``, one line."""
    assert status == expected, (status, body[:300])
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    return error


def _still_serving(server, answer: str) -> None:
    response = server["client"].post("/v1/completions", content=BODY)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == answer, response.text


# -- Expect: 100-continue -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, headers, length, auth, status", [
    ("/v1/completions", {}, len(BODY), False, 401),  # the API key's refusal, before the body
    ("/v1/completions", {}, 5 << 20, True, 413),  # over the body limit by its Content-Length
    ("/v1/nothing", {}, len(BODY), True, 404),
    ("/health", {}, len(BODY), True, 405),  # a POST to a GET route
    ("/v1/completions", {"Transfer-Encoding": "chunked"}, None, False, 401),  # a chunked body announced
])
def test_a_final_answer_to_expect_100_continue_closes_the_connection(server, answer, target, headers, length,
                                                                     auth, status):
    wire = Wire(server["port"])
    try:
        wire.send(_request("POST", target, headers={"Expect": "100-continue", **headers}, length=length, auth=auth))
        code, fields, body = wire.answer()  # no 100 Continue: the body is not wanted
        _error(code, body, status)
        assert fields.get("connection") == "close", fields
        # the client, told no, sends its next request instead of the body: before the fix the server read it as
        # the body (and waited for the rest of the promised bytes, or parsed the rest as a malformed request)
        wire.send(_request("GET", "/health"))
        assert wire.closed(), wire.buffer[:300]
    finally:
        wire.close()
    _still_serving(server, answer)


def test_expect_100_continue_read_by_the_app_keeps_the_connection(server, answer):
    wire = Wire(server["port"])
    try:
        wire.send(_request("POST", "/v1/completions", headers={"Expect": "100-continue"}, length=len(BODY)))
        assert wire.answer()[0] == 100  # the app reads the body: uvicorn asks for it
        wire.send(BODY)
        code, fields, body = wire.answer()
        assert code == 200 and json.loads(body)["choices"][0]["text"] == answer
        assert fields.get("connection") != "close"
        # a GET with the expectation but no body, and a refusal of a body that was sent: kept alive as before
        wire.send(_request("GET", "/health", headers={"Expect": "100-continue"}))
        assert wire.answer()[0] == 200
        wire.send(_request("POST", "/v1/nothing", BODY))
        _error(*wire.answer()[::2], 404)
        wire.send(_request("POST", "/v1/nothing", b" " * 300_000))  # a body the answer came before, read after it
        _error(*wire.answer()[::2], 404)  # (not taken for a request head over the limit)
        wire.send(_request("POST", "/v1/completions", BODY))
        code, fields, body = wire.answer()
        assert code == 200 and json.loads(body)["choices"][0]["text"] == answer
    finally:
        wire.close()


# -- absolute-form request targets ----------------------------------------------------------------------------------
def test_an_absolute_form_target_is_routed_by_its_path(server, answer):
    wire = Wire(server["port"])
    try:
        wire.send(_request("POST", f"{server['url']}/v1/completions", BODY))
        code, _, body = wire.answer()
        assert code == 200 and json.loads(body)["choices"][0]["text"] == answer, body[:300]
        wire.send(_request("GET", "HTTP://another.example:8080/health?x=1", auth=False))  # open route, any host
        code, _, body = wire.answer()
        assert code == 200 and json.loads(body)["status"] == "ok"
        wire.send(_request("POST", "http://localhost/v1/completions", BODY, auth=False))  # the key is still asked
        assert _error(*wire.answer()[::2], 401)["code"] == "invalid_api_key"
        wire.send(_request("GET", "http://localhost/v1/models/a1"))
        code, _, body = wire.answer()
        assert code == 200 and json.loads(body)["id"] == "a1"
    finally:
        wire.close()


# -- a request head over the parser's limit -------------------------------------------------------------------------
@pytest.mark.parametrize("first, rest", [
    (b"GET /v1/models/" + b"m" * 20_000, b" HTTP/1.1\r\nHost: localhost\r\n\r\n"),  # a long URL
    (b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Trace: " + b"t" * 20_000, b"\r\n\r\n"),  # a long header
])
def test_a_request_head_over_the_limit_is_431_not_malformed(server, answer, first, rest):
    wire = Wire(server["port"])
    try:
        wire.send(first)  # the head comes in two packets: h11 refuses it once the first is over its limit
        time.sleep(0.3)
        try:
            wire.send(rest)
        except OSError:  # the server may have answered and closed already
            pass
        error = _error(*wire.answer()[::2], 431)
        assert "over the limit of 16 KiB" in error["message"] and error["code"] == "request_too_large"
        assert wire.closed()
    finally:
        wire.close()
    wire = Wire(server["port"])  # a malformed head is still named so
    try:
        wire.send(b"GET /health HTTP/1.1\r\nNo Colon Here\r\n\r\n")
        assert _error(*wire.answer()[::2], 400)["code"] == "invalid_http"
    finally:
        wire.close()
    _still_serving(server, answer)


# -- JSON: the error inside a list of content parts ------------------------------------------------------------------
CHAT_PART = {"model": "a0", "max_tokens": 2, "messages": [{"role": "user", "content": [
    {"type": "text", "text": "Hi"}]}]}
INPUT_PART = {"model": "a0", "max_output_tokens": 16, "input": [{"role": "user", "content": [
    {"type": "input_text", "text": "Hi"}]}]}


@pytest.mark.parametrize("path, base, key, value, param, words", [
    ("/v1/chat/completions", CHAT_PART, "cache_control", {"type": "ephemeral"}, "messages.0.content.0.cache_control",
     "unknown field"),
    ("/v1/chat/completions", CHAT_PART, "text", None, "messages.0.content.0.text", "text: Input should be a valid "
     "string, got null"),
    ("/v1/chat/completions", CHAT_PART, "text", ..., "messages.0.content.0.text", "missing required field"),
    ("/v1/responses", INPUT_PART, "cache_control", {"type": "ephemeral"}, "input.0.content.0.cache_control",
     "unknown field"),
])
def test_a_bad_content_part_is_named_not_called_a_bad_string(server, path, base, key, value, param, words):
    body = json.loads(json.dumps(base))
    part = body.get("messages", body.get("input"))[0]["content"][0]
    if value is ...:
        del part[key]
    else:
        part[key] = value
    error = api_error(server["client"].post(path, json=body), 400)
    assert error["param"] == param and words in error["message"], error  # before: "...content: Input should be a
    assert server["client"].post(path, json=base).status_code == 200  # valid string, got list [...]"


# -- pipelining -----------------------------------------------------------------------------------------------------
def test_pipelined_requests_mixing_adapters_refusals_and_a_stream_are_answered_in_order(server, answer):
    """Requests sent back to back on one connection before any answer (HTTP/1.1 pipelining): each is answered in
    order, a refusal among them included, and a stream's events are those of the same request sent alone."""
    stream = json.dumps({"model": "a1", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True})
    alone = server["client"].post("/v1/completions", content=stream.replace('"stream": true', '"stream": false'))
    wire = Wire(server["port"], timeout=60)
    try:
        wire.send(_request("POST", "/v1/completions", BODY) + _request("POST", "/v1/completions", b'{"model": "a0",')
                  + _request("GET", "/health") + _request("POST", "/v1/completions", stream.encode())
                  + _request("POST", "/v1/chat/completions", b'{"model": "a0", "messages": []}')
                  + _request("POST", "/v1/completions", BODY, {"Connection": "close"}))
        code, _, body = wire.answer()
        assert code == 200 and json.loads(body)["choices"][0]["text"] == answer
        assert _error(*wire.answer()[::2], 400)["code"] == "invalid_json"
        assert json.loads(wire.answer()[2])["status"] == "ok"
        code, _, body = wire.answer()
        events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: {")]
        assert code == 200 and body.decode().rstrip().endswith("data: [DONE]")
        assert "".join(e["choices"][0]["text"] for e in events) == alone.json()["choices"][0]["text"]
        assert _error(*wire.answer()[::2], 400)["param"] == "messages"
        code, fields, body = wire.answer()
        assert code == 200 and json.loads(body)["choices"][0]["text"] == answer and fields["connection"] == "close"
        assert wire.closed()
    finally:
        wire.close()


# -- JSON: NaN and Infinity in a format -----------------------------------------------------------------------------
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", '{"model": "a0", "prompt": "x", "max_tokens": 4, "guided_json": {"const": Infinity}}'),
    ("/v1/completions", '{"model": "a0", "prompt": "x", "max_tokens": 4, "guided_json": {"enum": [1, NaN]}}'),
    ("/v1/chat/completions", '{"model": "a0", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], '
     '"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "number", '
     '"maximum": -Infinity}}}}'),
])
def test_nan_or_infinity_in_a_format_is_refused_not_read_as_null(server, path, body):
    response = server["client"].post(path, content=body, headers={"Content-Type": "application/json"})
    error = api_error(response, 400)  # before: a 200 whose answer was "null", or "Expected f64 ..., got null"
    assert "NaN or Infinity" in error["message"] and error["code"] == "invalid_response_format", error
    finite = body.replace("-Infinity", "0").replace("Infinity", "1").replace("NaN", "2")
    assert server["client"].post(path, content=finite, headers={"Content-Type": "application/json"}).status_code == 200


@pytest.mark.parametrize("field, value, words", [
    ("chat_template_kwargs", '{"enable_thinking": false, "budget": NaN}', "option 'budget' holds nan"),
    ("chat_template_kwargs", '{"levels": [1, {"x": -Infinity}]}', "option 'levels' holds -inf"),
    ("vllm_xargs", '{"scale": Infinity}', "'scale' holds inf"),
    ("vllm_xargs", '{"scales": [1, NaN]}', "'scales' holds nan"),
])
def test_nan_or_infinity_in_template_options_or_xargs_is_refused(server, field, value, words):
    """Python's json reads NaN and Infinity, which are no JSON: they reached the chat template (rendered "nan") or
    vllm_xargs as they were; vLLM's parser refuses them."""
    body = ('{"model": "a0", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}], '
            f'"{field}": {value}}}')
    error = api_error(server["client"].post("/v1/chat/completions", content=body,
                                            headers={"Content-Type": "application/json"}), 400)
    assert words in error["message"] and field in (error["param"] or "") + error["message"], error
    finite = body.replace("-Infinity", "0").replace("Infinity", "1").replace("NaN", "2")
    assert server["client"].post("/v1/chat/completions", content=finite,
                                 headers={"Content-Type": "application/json"}).status_code == 200


def test_training_refuses_nan_in_template_options():
    from lorakit.errors import LorakitError
    from lorakit.train.config import check_template_kwargs

    with pytest.raises(LorakitError, match=r"--chat-template-kwargs: option 'x' holds nan, which is not a JSON number"):
        check_template_kwargs('{"x": NaN}')
    assert check_template_kwargs('{"x": 1.5, "y": [true, "s"]}') == {"x": 1.5, "y": [True, "s"]}


# -- a WebSocket upgrade --------------------------------------------------------------------------------------------
def test_a_websocket_upgrade_gets_the_error_body_of_an_unknown_route(server, answer):
    wire = Wire(server["port"])
    try:
        wire.send(_request("GET", "/v1/realtime?model=a0", headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}))
        error = _error(*wire.answer()[::2], 404)  # before, with websockets installed: 403, empty body
        assert "no route GET '/v1/realtime'" in error["message"]
    finally:
        wire.close()
    _still_serving(server, answer)


@pytest.mark.parametrize("before", [b"\r\n", b"\n", b"\r\n\r\n"], ids=["crlf", "lf", "two-crlf"])
def test_empty_lines_before_a_request_line_are_ignored(server, answer, before):
    """RFC 9112 2.2: a server SHOULD ignore at least one empty line before a request-line. Some clients end a POST
    body with an extra CRLF that is not counted in its Content-Length; on a kept-alive connection that line came
    before the next request, which got a 400 and a closed connection."""
    wire = Wire(server["port"], timeout=60)
    try:
        wire.send(before + _request("POST", "/v1/completions", BODY) + before + _request("GET", "/health"))
        code, _, body = wire.answer()
        assert code == 200 and json.loads(body)["choices"][0]["text"] == answer
        code, _, body = wire.answer()
        assert code == 200 and json.loads(body)["status"] == "ok"
    finally:
        wire.close()
