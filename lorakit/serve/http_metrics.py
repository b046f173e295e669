"""Every HTTP answer of the server counted by method, route and status, for ``GET /metrics``
(``lorakit_http_requests_total``: serve.metrics writes them out).

:class:`CountRequests` is an ASGI middleware around the whole app (the API-key check, CORS and body limits
included), so 401s, 403s, 413s and 500s are counted too; only requests uvicorn itself refuses (a request line it
cannot parse) never reach it. Labels stay few whatever clients send: the route is the template of the route that
matched (``/v1/models/{model:path}``, not each model's path), ``unmatched`` for any path no route has (each 404
would otherwise be a series of its own), and methods other than HTTP's usual ones are ``other``.
"""

from __future__ import annotations

import threading

from starlette.routing import Match

UNMATCHED = "unmatched"  # no route template is without its leading "/", so no route reads as this
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HTTPCounts:
    """``(method, route, status) -> answers``; written on the event loop, read by a scrape on a worker thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, int], int] = {}

    def add(self, method: str, route: str, status: int) -> None:
        key = (method if method in METHODS else "other", route, status)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> dict[tuple[str, str, int], int]:
        with self._lock:
            return dict(self._counts)


class CountRequests:
    """ASGI middleware: count each HTTP request in ``counts`` once its answer starts (a stream's status is known
    then), or, where the app raised before answering, as the 500 the server sends."""

    def __init__(self, app, counts: HTTPCounts, routes=()):
        """``routes``: the app's routes (``FastAPI.router.routes``), to name the route of a request answered before
        the router saw it (a 401 of the API-key check, a 413, a CORS refusal)."""
        self.app, self.counts, self.routes = app, counts, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = None

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.counts.add(scope.get("method", ""), self._route(scope), 500 if status is None else status)

    def _route(self, scope) -> str:
        """The template of the route ``scope``'s path is for, or :data:`UNMATCHED`."""
        # the router writes the route it matched (one that refuses the method too: the 405's) into the scope
        route = scope.get("route")
        if route is None:  # answered before the router: the route it would have matched
            route = next((r for r in self.routes if r.matches(dict(scope))[0] is not Match.NONE), None)
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else UNMATCHED
