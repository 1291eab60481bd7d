"""Failure alerts: the automations of `infra/automations.yaml` (a training or scoring flow
run that ends Failed or Crashed posts to a webhook), and the receiver the local stack
points that webhook at.

    python -m infra.alerts apply                      # any Prefect server
    python -m infra.alerts serve --port P --out FILE  # the receiver (`stack up` runs it)

`apply` talks to $PREFECT_API_URL (with $PREFECT_API_AUTH_STRING or $PREFECT_API_KEY when
set) and posts alerts to $CIFAR_ALERT_WEBHOOK_URL (a Slack incoming webhook, or any URL
that takes a JSON POST); running it again changes only what the file or the URL changed.
The receiver (standard library only) appends each POST body to its file as one JSON line,
a body that is not JSON as a JSON string, and answers GET with how many it has received.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import urllib.error
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from infra.procs import StackError
from infra.services import prefect_api, prefect_headers

AUTOMATIONS = Path(__file__).with_name("automations.yaml")
BLOCK_NAME = "cifar-alerts"  # the Webhook block the automations post through
WEBHOOK_ENV = "CIFAR_ALERT_WEBHOOK_URL"
MAX_BODY = 1 << 20  # bytes; an alert is a few hundred

# api(path, method=, body=): the decoded answer of the Prefect API (None when empty).
Api = Callable[..., object]


def ensure_webhook_block(api: Api, url: str) -> str:
    """The id of the Webhook block `cifar-alerts`, created or set to post to `url`."""
    data = {"url": url, "method": "POST", "headers": {"Content-Type": "application/json"}}
    try:
        found = api(f"/block_types/slug/webhook/block_documents/name/{BLOCK_NAME}")
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        found = None
    if found is not None:
        api(f"/block_documents/{found['id']}", method="PATCH",
            body={"data": data, "merge_existing_data": False})
        return found["id"]
    block_type = api("/block_types/slug/webhook")
    schemas = api("/block_schemas/filter", method="POST", body={
        "block_schemas": {"block_type_id": {"any_": [block_type["id"]]}}, "limit": 1})
    if not schemas:
        raise StackError("the Prefect server has no schema for its Webhook block type; "
                         "is it a Prefect 3 server?")
    created = api("/block_documents/", method="POST", body={
        "name": BLOCK_NAME, "data": data, "block_schema_id": schemas[0]["id"],
        "block_type_id": block_type["id"]})
    return created["id"]


def load_automations(block_id: str, path: Path = AUTOMATIONS) -> list[dict]:
    """The automations of `path`, each webhook action pointed at the block `block_id`."""
    import yaml

    document = yaml.safe_load(path.read_text())
    automations = document["automations"] if isinstance(document, dict) else document
    for automation in automations:
        for key in ("actions", "actions_on_trigger", "actions_on_resolve"):
            for action in automation.get(key, []):
                if action.get("type") in ("call-webhook", "send-notification"):
                    action.setdefault("block_document_id", block_id)
    return automations


def apply_automations(api: Api, automations: list[dict]) -> list[str]:
    """Create each automation, or update the one of its name: a name is never doubled
    (copies left by hand are deleted, or each failure would alert twice)."""
    lines = []
    for automation in automations:
        name = automation["name"]
        found = api("/automations/filter", method="POST", body={
            "automations": {"name": {"any_": [name]}}, "sort": "CREATED_DESC"})
        if not found:
            api("/automations/", method="POST", body=automation)
            lines.append(f"automation {name!r} created")
            continue
        *extra, oldest = found
        api(f"/automations/{oldest['id']}", method="PUT", body=automation)
        for copy in extra:
            api(f"/automations/{copy['id']}", method="DELETE")
        lines.append(f"automation {name!r} up to date"
                     + (f" ({len(extra)} copies deleted)" if extra else ""))
    return lines


def apply(api: Api, webhook_url: str, where: str) -> list[str]:
    """The block and the automations of AUTOMATIONS on the server behind `api`; `where`
    names that server in errors."""
    try:
        block_id = ensure_webhook_block(api, webhook_url)
        return apply_automations(api, load_automations(block_id))
    except urllib.error.HTTPError as e:
        detail = ""
        with contextlib.suppress(OSError):
            detail = e.read().decode(errors="replace")[:1000]
        raise StackError(f"the Prefect server at {where} refused the alert set-up: HTTP "
                         f"{e.code} {e.reason} {detail}") from e
    except OSError as e:
        raise StackError(f"the Prefect server at {where} did not answer ({e})") from e


def redacted(url: str) -> str:
    """Scheme and host only: a webhook's path is often its secret (Slack's is)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…" if parts.path.strip("/") else url


def _cmd_apply(_args: argparse.Namespace) -> int:
    api_url = os.environ.get("PREFECT_API_URL")
    webhook = os.environ.get(WEBHOOK_ENV)
    if not api_url:
        raise StackError("PREFECT_API_URL is not set: point it at the Prefect server, "
                         "e.g. http://prefect-host:4200/api")
    if not webhook or not webhook.startswith(("http://", "https://")):
        raise StackError(f"{WEBHOOK_ENV} must be the http(s) URL alerts are posted to, "
                         "e.g. a Slack incoming webhook")
    headers = prefect_headers(os.environ.get("PREFECT_API_AUTH_STRING"),
                              os.environ.get("PREFECT_API_KEY"))
    for line in apply(prefect_api(api_url, headers), webhook, api_url):
        print(f"{line}; alerts go to {redacted(webhook)}")
    return 0


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def _reply(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self._reply(200, {"received": self.server.received, "file": str(self.server.out)})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._reply(413, {"error": f"body over {MAX_BODY} bytes"})
            return
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", errors="replace")
        self.server.append(json.dumps(body, ensure_ascii=False, separators=(",", ":")))
        self._reply(200, {"ok": True})


class Receiver(ThreadingHTTPServer):
    """The receiver, bound but not yet serving (`serve_forever`)."""

    def __init__(self, host: str, port: int, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        super().__init__((host, port), _Handler)
        self.out = out
        self.received = 0
        self._lock = threading.Lock()

    def append(self, line: str) -> None:
        with self._lock, open(self.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            self.received += 1


def _cmd_serve(args: argparse.Namespace) -> int:
    server = Receiver(args.host, args.port, Path(args.out))
    print(f"alert receiver on http://{args.host}:{args.port}, appending to {args.out}",
          flush=True)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.alerts", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("apply", help=f"the webhook block and the automations, to ${WEBHOOK_ENV}"
                   ).set_defaults(handler=_cmd_apply)
    serve = sub.add_parser("serve", help="append each POST body to a file as a JSON line")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--out", required=True, help="the JSON-lines file")
    serve.set_defaults(handler=_cmd_serve)
    args = p.parse_args(argv)
    try:
        return args.handler(args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
