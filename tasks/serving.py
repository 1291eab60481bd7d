"""`cifar-pipeline serve`: MLflow's scoring server behind the limits it lacks. It parses
any body whole (124 MB of JSON took 4.8 GB) and answers deep nesting with a 500; here a
body is read up to `MAX_BODY_BYTES` (then 413) and its nesting measured (past `MAX_DEPTH`,
400) before MLflow sees it."""

from __future__ import annotations

import re

import numpy as np

# 16 MiB of JSON holds about 850 images in the densest spelling (`255, ` per value); the
# parsed lists take about 40x the body's size, so one request stays under 1 GB.
MAX_BODY_BYTES = 16 * 2**20
# {"inputs": [images [rows [pixels [values]]]]} nests 5 deep; headroom for other forms.
MAX_DEPTH = 8
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')  # brackets inside strings are text
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def nesting_depth(body: bytes) -> int:
    """How deep the JSON's arrays and objects nest, unparsed (50 ms for the largest body)."""
    brackets = np.frombuffer(_STRINGS.sub(b"", body).translate(None, _NOT_BRACKETS), np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


class RequestLimits:
    """ASGI middleware: a POST body over `max_bytes` gets 413, one nested deeper than
    `max_depth` gets 400; the rest is passed on whole."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH):
        self.app, self.max_bytes, self.max_depth = app, max_bytes, max_depth

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        # A declared length is refused unread; a chunked body, once past the limit.
        while more and int(dict(scope["headers"]).get(b"content-length", 0)) <= self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= self.max_bytes
        if more or len(body) > self.max_bytes:
            return await _refuse(413, f"the request body is over the limit of "
                                 f"{self.max_bytes:,} bytes: send fewer images per request",
                                 scope, receive, send)
        if (depth := nesting_depth(body)) > self.max_depth:
            return await _refuse(400, f"the JSON nests {depth} levels deep, more than "
                                 f"{self.max_depth}: send {{\"inputs\": [...]}} with one "
                                 "32x32x3 nested list per image", scope, receive, send)
        replayed = [{"type": "http.request", "body": body, "more_body": False}]
        return await self.app(scope, lambda: _next(replayed, receive), send)


async def _next(replayed: list, receive) -> dict:
    """The body once, then what the connection says (a disconnect)."""
    return replayed.pop() if replayed else await receive()


async def _refuse(status: int, message: str, scope, receive, send) -> None:
    from starlette.responses import JSONResponse

    code = "RESOURCE_LIMIT_EXCEEDED" if status == 413 else "INVALID_PARAMETER_VALUE"
    await JSONResponse({"error_code": code, "message": message}, status_code=status)(
        scope, receive, send)


def serve(model_uri: str, host: str, port: int) -> int:
    """Load the model, then answer on host:port until stopped (MLflow's routes)."""
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    uvicorn.run(RequestLimits(scoring_server.init(mlflow.pyfunc.load_model(model_uri))),
                host=host, port=port)
    return 0
