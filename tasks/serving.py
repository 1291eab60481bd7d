"""`cifar-pipeline serve`: MLflow's scoring server for a registered model, behind limits
that it lacks, checked before a byte of the body is parsed.

MLflow's server reads any body whole and parses it into Python lists: 124 MB of JSON
took 4.8 GB, and a deeply nested array made its parser fail with a 500. Here the body is
read up to `MAX_BODY_BYTES` (413 past it, before reading the rest), and its bracket
nesting is measured (400 past `MAX_DEPTH`) before MLflow sees it.
"""

from __future__ import annotations

import re

import numpy as np

# 16 MiB of JSON holds about 850 images in the densest spelling (`255, ` per value); the
# parsed lists take about 40x the body's size, so one request stays under 1 GB.
MAX_BODY_BYTES = 16 * 2**20
# {"inputs": [images [rows [pixels [values]]]]} nests 5 deep; the headroom is for
# MLflow's other request forms.
MAX_DEPTH = 8
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')  # brackets inside strings are text
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def nesting_depth(body: bytes) -> int:
    """How deep the JSON text's arrays and objects nest, without parsing it (about 50 ms
    for the largest body)."""
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
        too_big = (413, f"the request body is over the limit of {self.max_bytes:,} bytes: "
                   "send fewer images per request")
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if int(length) > self.max_bytes:  # uvicorn has refused a non-number already
            return await _refuse(*too_big)(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:  # a chunked body has no length to check first
                return await _refuse(*too_big)(scope, receive, send)
        if (depth := nesting_depth(body)) > self.max_depth:
            return await _refuse(400, f"the JSON nests {depth} levels deep, more than "
                                 f"{self.max_depth}: send {{\"inputs\": [...]}} with one "
                                 "32x32x3 nested list per image")(scope, receive, send)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _refuse(status: int, message: str):
    from starlette.responses import JSONResponse

    code = "RESOURCE_LIMIT_EXCEEDED" if status == 413 else "INVALID_PARAMETER_VALUE"
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


def serve(model_uri: str, host: str, port: int) -> int:
    """Load the model, then answer on host:port until stopped (MLflow's routes: /ping,
    /health, /version, /invocations)."""
    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(mlflow.pyfunc.load_model(model_uri))
    uvicorn.run(RequestLimits(app), host=host, port=port)
    return 0
