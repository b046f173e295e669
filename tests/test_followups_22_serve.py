"""``lorakit serve``: request ids and hostile HTTP clients (session 22), over real sockets (one server for the module).

- Request ids: vLLM (``--enable-request-id-headers``) and OpenAI answer every request with an ``x-request-id``
  header; vLLM's is the client's ``X-Request-Id`` where one was sent, else a new uuid4 hex, and its completions and
  chat completions are named ``cmpl-<X-Request-Id>`` / ``chatcmpl-<X-Request-Id>`` (its ``_base_request_id``: the
  header over the body's ``request_id``). lorakit sent no such header. Now every answer carries one, errors
  included (400, 401, 403, 404, 405, 413, the parser's own 400s, CORS preflights); a client's id is taken
  when it is 1-256 characters of ``A-Za-z0-9._~:/+=@-`` and replaced with a new one otherwise (vLLM echoes any
  value), so no client's bytes reach a response header or the log; the answer's id is ``prefix-<id>``
  (the header's, else the body's ``request_id``, else the server's own), so an answer and its header name one
  id; a 500's traceback in the server log is headed by the request's id; browsers may read it (CORS exposes it).
- A request with a Transfer-Encoding other than chunked (``gzip, chunked``, ``identity``) was a 400 that said
  "HTTP/1.1 needs a Host header, Content-Length a non-negative integer": now a 400 that says what to send (not RFC
  9112's suggested 501: the server's 5xx are its own faults, as test_followups_16_fuzz holds).
  Two Content-Lengths, two Hosts, a chunk size that is no hex number, a space in the path: each its own message.
- ``Upgrade: h2c`` (what ``curl --http2`` sends on every http:// request) or ``Upgrade: websocket`` logged two
  warnings a request, one of them "No supported WebSocket library detected. Please use pip install
  'uvicorn[standard]'": the request is served over HTTP/1.1 and nothing is to install; now nothing is logged.
"""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from test_serve_support import ServerProcess, tiny_hf_folder

KEY = "k22"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://ok.example"
HEX_ID = re.compile(r"[0-9a-f]{32}")
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}

# the server's /v1/models fails with a bug of its own (a 500), to see its trace in the log named by request id
_HOOK = '''
import lorakit.serve.app as app


def _broken(state, names):
    raise RuntimeError("a bug planted by test_followups_22_serve")


app._own_tokenizers = _broken
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("fu22")
    model = tiny_hf_folder(root / "model")
    (root / "adapters").mkdir()
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_HOOK)
    path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))
    process = ServerProcess(model, root / "adapters", "--max-tokens", "16", "--cors-origin", ORIGIN, api_key=KEY,
                            log=root / "server.log", env={"PYTHONPATH": path})
    client = httpx.Client(base_url=process.url, timeout=60, headers=AUTH)
    try:
        yield {"client": client, "process": process, "port": process.port}
    finally:
        client.close()
        process.stop()


def _wire(server, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, list[str]], bytes]:
    """Send ``data`` on a new connection; the first answer's status, headers (lower-case names, all values) and
    body (up to the connection's close, or its Content-Length)."""
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=timeout) as sock:
        sock.sendall(data)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(65536)
            assert chunk, raw
            raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[0])
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk
            body += chunk
    return int(lines[0].split()[1]), headers, body


def _one_id(headers) -> str:
    """The answer's one x-request-id (httpx headers or ``_wire``'s)."""
    values = headers.get_list("x-request-id") if isinstance(headers, httpx.Headers) else headers.get("x-request-id", [])
    assert len(values) == 1, values
    return values[0]


# -- every answer has an id ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, path, headers, body, status", [
    ("GET", "/health", {}, None, 200),
    ("GET", "/v1/adapters", AUTH, None, 200),
    ("POST", "/v1/chat/completions", AUTH, CHAT, 200),
    ("POST", "/v1/chat/completions", {}, CHAT, 401),  # the API key's refusal
    ("POST", "/v1/chat/completions", AUTH, b"{not json", 400),
    ("GET", "/v1/nope", AUTH, None, 404),
    ("GET", "/v1/chat/completions", AUTH, None, 405),
    ("POST", "/v1/completions", {**AUTH, "Origin": "http://evil.example"}, {"prompt": "x"}, 403),  # CORS
    ("POST", "/v1/completions", AUTH, b"x" * (2 << 20), 413),
    ("OPTIONS", "/v1/chat/completions", {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}, None, 200),
    ("OPTIONS", "/v1/chat/completions", {"Origin": "http://evil.example",
                                         "Access-Control-Request-Method": "POST"}, None, 400),
], ids=["health", "adapters", "chat", "401", "bad-json", "404", "405", "403-cors", "413", "preflight", "preflight-400"])
def test_every_answer_has_a_new_request_id(server, method, path, headers, body, status):
    """Before: no x-request-id header on any answer. Now a new uuid4 hex on each, refusals included."""
    seen = set()
    for _ in range(2):
        kwargs = {"json": body} if isinstance(body, dict) else {"content": body} if body is not None else {}
        response = httpx.request(method, server["process"].url + path, headers=headers, timeout=60, **kwargs)
        assert response.status_code == status, response.text[:300]
        ident = _one_id(response.headers)
        assert HEX_ID.fullmatch(ident), ident
        seen.add(ident)
    assert len(seen) == 2  # one per request


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\n\r\n",  # no Host
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
], ids=["no-host", "gzip"])
def test_the_parsers_own_refusals_have_a_request_id(server, head):
    status, headers, _ = _wire(server, head)
    assert status == 400 and HEX_ID.fullmatch(_one_id(headers))


# -- a client's id -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, prefix", [
    ("/v1/chat/completions", CHAT, "chatcmpl-"),
    ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 2}, "cmpl-"),
    ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 0, "echo": True}, "cmpl-"),
    ("/v1/responses", {"model": "base", "input": "hi", "max_output_tokens": 16}, "resp_"),
], ids=["chat", "completions", "echo-only", "responses"])
def test_a_clients_request_id_is_echoed_and_names_the_answer(server, path, body, prefix):
    """vLLM's order: the header's id, over the body's request_id, names the answer; without a header the body's;
    without either, the server's own id, the one its header carries."""
    client = server["client"]
    response = client.post(path, json=body, headers={"X-Request-Id": "trace-7f3a:span/2"})
    assert response.status_code == 200, response.text[:300]
    assert _one_id(response.headers) == "trace-7f3a:span/2"
    assert response.json()["id"] == prefix + "trace-7f3a:span/2"
    response = client.post(path, json={**body, "request_id": "from-body"}, headers={"X-Request-Id": "from-header"})
    assert response.json()["id"] == prefix + "from-header" and _one_id(response.headers) == "from-header"
    response = client.post(path, json={**body, "request_id": "from-body"})
    assert response.json()["id"] == prefix + "from-body" and HEX_ID.fullmatch(_one_id(response.headers))
    response = client.post(path, json=body)
    assert response.json()["id"] == prefix + _one_id(response.headers)


def test_a_streamed_answer_carries_the_id_in_its_header_and_chunks(server):
    with server["client"].stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                                 headers={"X-Request-Id": "stream-1"}) as response:
        assert response.status_code == 200 and _one_id(response.headers) == "stream-1"
        ids = {json.loads(line[6:])["id"] for line in response.iter_lines() if line.startswith("data: {")}
    assert ids == {"chatcmpl-stream-1"}


@pytest.mark.parametrize("status, path, headers", [
    (401, "/v1/models", {}), (404, "/v1/nope", AUTH), (400, "/tokenize", AUTH)])
def test_a_refusal_echoes_the_clients_id(server, status, path, headers):
    method = "POST" if path == "/tokenize" else "GET"
    response = httpx.request(method, server["process"].url + path, headers={**headers, "X-Request-Id": "err-1"},
                             content=b"{" if method == "POST" else None, timeout=60)
    assert response.status_code == status and _one_id(response.headers) == "err-1"


@pytest.mark.parametrize("value", [
    b"a" * 257, b"caf\xc3\xa9", b"ab\xffcd", b"two words", b'"quoted"', b"ab\tcd", b"<script>", b"a;b", b"a,b",
    b"%0d%0aSet-Cookie:x", b"",
], ids=["257-chars", "utf8", "latin1-byte", "space", "quotes", "tab", "angle", "semicolon", "comma", "percent",
        "empty"])
def test_a_request_id_out_of_the_charset_is_replaced_with_a_new_one(server, value):
    """vLLM echoes any value; here one that could carry what a header, an id or a log line should not is not
    copied anywhere: the answer gets a new id (and the answer's id is that one)."""
    body = json.dumps({"model": "base", "prompt": "hi", "max_tokens": 1}).encode()
    status, headers, answer = _wire(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                    + KEY.encode() + b"\r\nX-Request-Id: " + value + b"\r\nContent-Length: %d\r\n\r\n"
                                    % len(body) + body)
    assert status == 200, answer[:300]
    ident = _one_id(headers)
    assert HEX_ID.fullmatch(ident) and json.loads(answer)["id"] == f"cmpl-{ident}"


def test_the_longest_id_taken_and_the_first_of_two(server):
    longest = "A-._~:/+=@" + "z" * 246
    response = server["client"].get("/health", headers={"X-Request-Id": longest})
    assert _one_id(response.headers) == longest
    status, headers, _ = _wire(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: one\r\n"
                                       b"X-Request-Id: two\r\n\r\n")
    assert status == 200 and _one_id(headers) == "one"


def test_a_header_injection_in_the_id_is_refused_by_the_parser(server):
    """A CR inside the value (a client trying to add a Set-Cookie to the answer) never reaches the app: a 400 of
    the OpenAI error body, with an id of the server's, and no header of the client's."""
    status, headers, body = _wire(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\rSet-Cookie: s=1\r\n\r\n")
    assert status == 400 and "set-cookie" not in headers and HEX_ID.fullmatch(_one_id(headers))
    assert json.loads(body)["error"]["code"] == "invalid_http"


def test_a_browser_may_read_the_request_id(server):
    """CORS hides response headers a server does not expose from a page's script."""
    response = httpx.get(server["process"].url + "/v1/adapters", headers={**AUTH, "Origin": ORIGIN})
    exposed = {h.strip().lower() for h in response.headers.get("access-control-expose-headers", "").split(",")}
    assert response.status_code == 200 and "x-request-id" in exposed


def test_a_500s_trace_in_the_log_is_named_by_the_request_id(server):
    response = server["client"].get("/v1/models", headers={"X-Request-Id": "bug-report-42"})
    assert response.status_code == 500 and _one_id(response.headers) == "bug-report-42"
    log = _log_after(server, "a bug planted by test_followups_22_serve")
    assert "internal error in request bug-report-42:" in log
    at = log.index("internal error in request bug-report-42:")
    assert log.index("Traceback", at) < log.index("a bug planted", at)
    response = server["client"].get("/v1/models", headers={"X-Request-Id": "evil\x7f"})  # DEL: not taken
    assert response.status_code == 500
    assert f"internal error in request {_one_id(response.headers)}:" in _log_after(server, _one_id(response.headers))
    assert "evil" not in server["process"].output()


def _log_after(server, text: str, seconds: float = 5.0) -> str:
    """The server's log once ``text`` is in it (its writes come a moment after the answer)."""
    deadline = time.monotonic() + seconds
    while text not in (log := server["process"].log.read_text(errors="replace")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return log


# -- what the HTTP parser refuses, said -----------------------------------------------------------------------------
@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity", b"chunked, gzip"])
def test_a_transfer_coding_other_than_chunked_is_a_400_saying_what_to_send(server, coding):
    """Before: a 400 that said HTTP/1.1 needs a Host header and Content-Length a non-negative integer, neither of
    which was the matter."""
    status, headers, body = _wire(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding
                                  + b"\r\n\r\n0\r\n\r\n")
    error = json.loads(body)["error"]
    assert status == 400 and headers["connection"] == ["close"]
    assert error["code"] == "unsupported_transfer_encoding" and "Content-Length" in error["message"]
    assert "Host" not in error["message"]


@pytest.mark.parametrize("head, words", [
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", "Content-Length headers of different values"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "more than one Host header"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "chunk"),
    (b"GET /v1/models/a b HTTP/1.1\r\nHost: x\r\n\r\n", "percent-encoded"),
], ids=["two-lengths", "two-hosts", "chunk-size", "space-in-path"])
def test_a_malformed_request_is_told_what_is_malformed(server, head, words):
    status, headers, body = _wire(server, head)
    error = json.loads(body)["error"]
    assert status == 400 and headers["connection"] == ["close"] and error["code"] == "invalid_http"
    assert error["message"].startswith("malformed HTTP request: ") and words in error["message"]
    assert "needs a Host header, Content-Length" not in error["message"]


@pytest.mark.parametrize("upgrade", [b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
                                     b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="], ids=["h2c", "websocket"])
def test_an_upgrade_request_is_served_without_a_warning_in_the_log(server, upgrade):
    """curl --http2 on an http:// URL sends Upgrade: h2c; each such request logged "Unsupported upgrade request."
    and "No supported WebSocket library detected. Please use pip install 'uvicorn[standard]'"."""
    before = server["process"].log.read_text(errors="replace")
    status, _, body = _wire(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n\r\n")
    assert status == 200 and json.loads(body)["status"] == "ok"
    time.sleep(0.3)
    added = server["process"].log.read_text(errors="replace")[len(before):]
    assert "upgrade" not in added.lower() and "WebSocket" not in added


def test_pipelined_requests_each_get_their_own_id(server):
    """Three requests back to back on one connection (HTTP/1.1 pipelining): three answers, in order, each with
    the id its request sent."""
    body = json.dumps({"model": "base", "prompt": "hi", "max_tokens": 1}).encode()
    requests = b"".join(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                        + b"\r\nX-Request-Id: p%d\r\nContent-Length: %d\r\n\r\n" % (i, len(body)) + body
                        for i in range(3))
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
        sock.sendall(requests)
        raw = b""
        while raw.count(b'"usage"') < 3:
            chunk = sock.recv(65536)
            assert chunk, raw
            raw += chunk
    assert re.findall(rb"x-request-id: (\S+)\r\n", raw) == [b"p0", b"p1", b"p2"]
    assert re.findall(rb'"id":"cmpl-(\w+)"', raw) == [b"p0", b"p1", b"p2"]


# -- lorakit serve --help ------------------------------------------------------------------------------------------
def test_every_serve_flag_has_help_and_the_api_key_names_every_open_route():
    """--api-key said "every endpoint but /health", while /ping, /version and /metrics (vLLM's) need no key either;
    flags showed argparse's own metavars (MAX_LOADED, BODY_TIMEOUT, ADAPTERS ADAPTERS)."""
    import argparse

    from lorakit.serve.cli import add_arguments
    from lorakit.serve.vllm_routes import OPEN_ROUTES

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {action.option_strings[-1]: action for action in parser._actions if action.dest != "help"}
    for flag, action in flags.items():
        assert action.help and len(action.help) > 20, flag
        shown = action.metavar or action.dest.upper()
        assert action.nargs == 0 or action.choices or "_" not in shown, (flag, shown)
    assert all(route in flags["--api-key"].help for route in OPEN_ROUTES)
    grammar = flags["--tool-call-grammar"]
    assert grammar.choices == ("auto", "off") and "'auto' (default)" in grammar.help and "'off'" in grammar.help
