"""ASGI middleware that refuses request bodies over a size limit with 413 in the OpenAI envelope."""

from __future__ import annotations

from server.errors import PayloadTooLarge, error_response


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes with 413 (checks the header and the stream).

    The body is read here, up to the limit, and replayed to the app: raising from inside
    ``receive`` would be caught by FastAPI's body parsing and turned into a generic 400.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = PayloadTooLarge(f"request body exceeds {self.limit} bytes")
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await error_response(err)(scope, receive, send)
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # client went away before sending its body
                return None
            body = msg.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                return await error_response(err)(scope, receive, send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            # the buffered body once, then the real channel (disconnect detection needs it)
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)
