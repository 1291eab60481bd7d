"""Failure alerts without a Prefect server: the receiver the local stack runs, the
automations file (valid for Prefect, aimed at the pipeline's real flow names, its message
valid JSON whatever the error says). tests/integration/test_failure_alerts_on_stack.py runs
them on the stack."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest

from infra import alerts, services

REPO = Path(__file__).resolve().parents[2]
ALERTED_FLOWS = {"train-resnets", "train-variant", "score-competition"}


@pytest.fixture
def receiver(tmp_path):
    server = alerts.Receiver("127.0.0.1", 0, tmp_path / "alerts.jsonl")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "alerts.jsonl"
    finally:
        server.shutdown()
        server.server_close()


def _post(url: str, data: bytes) -> int:
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


def test_the_receiver_appends_each_post_body_as_one_json_line(receiver):
    url, out = receiver
    first = {"text": 'run "a"\nfailed', "url": "http://x/runs/flow-run/1"}
    assert _post(url, json.dumps(first, indent=2).encode()) == 200
    assert _post(url + "/hook", b"plain text, not JSON") == 200
    lines = out.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [first, "plain text, not JSON"]
    with urllib.request.urlopen(url, timeout=5) as response:
        assert json.loads(response.read())["received"] == 2


def _automation(block_id: str) -> dict:
    (automation,) = alerts.load_automations(block_id)
    return automation


def test_the_automation_is_valid_for_prefect_and_posts_through_the_block():
    from prefect.events.schemas.automations import AutomationCore

    block_id = str(uuid.uuid4())
    automation = _automation(block_id)
    parsed = AutomationCore.model_validate(automation)
    assert [str(a.block_document_id) for a in parsed.actions] == [block_id]
    trigger = automation["trigger"]
    assert set(trigger["expect"]) == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert trigger["posture"] == "Reactive" and trigger["threshold"] == 1


def test_the_alerted_flow_names_are_the_pipelines_flows():
    """A renamed flow would silently stop alerting."""
    names = set(_automation(str(uuid.uuid4()))["trigger"]["match_related"]
                ["prefect.resource.name"])
    assert names == ALERTED_FLOWS
    defined = set()
    for path in (REPO / "flows").glob("*.py"):
        defined |= set(re.findall(r'@flow\(\s*name="([^"]+)"', path.read_text()))
    assert defined >= ALERTED_FLOWS, defined


def test_the_message_is_json_naming_the_run_its_error_and_its_link_whatever_the_error():
    from prefect.server.events.jinja_filters import all_filters
    from prefect.server.schemas.core import Flow, FlowRun
    from prefect.server.schemas.states import State, StateType
    from prefect.server.utilities.user_templates import (
        register_user_template_filters,
        render_user_template,
    )
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    message = 'FileNotFoundError: "/data/<x>.pkl" & more\nsecond line'
    flow = Flow(name="score-competition")
    run = FlowRun(name="brave-otter", flow_id=flow.id,
                  state=State(type=StateType.FAILED, name="Failed", message=message))
    register_user_template_filters(all_filters)
    template = _automation(str(uuid.uuid4()))["actions"][0]["payload"]
    with temporary_settings({PREFECT_UI_URL: "http://prefect.example:4200"}):
        rendered = asyncio.run(render_user_template(template, {"flow_run": run, "flow": flow}))
    alert = json.loads(rendered)
    url = f"http://prefect.example:4200/runs/flow-run/{run.id}"
    assert alert == {"text": f"Flow run brave-otter (score-competition) ended Failed: "
                             f"{message}\n{url}",
                     "flow": "score-competition", "flow_run": "brave-otter",
                     "flow_run_id": str(run.id), "state": "Failed", "message": message,
                     "url": url}


def test_a_webhook_url_with_a_path_is_printed_without_it():
    assert alerts.redacted("https://hooks.slack.com/services/T0/B0/secret") == \
        "https://hooks.slack.com/…"
    assert alerts.redacted("http://127.0.0.1:8080") == "http://127.0.0.1:8080"


def test_apply_without_a_webhook_url_says_what_to_set(monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.delenv(alerts.WEBHOOK_ENV, raising=False)
    assert alerts.main(["apply"]) == 1
    assert f"error: {alerts.WEBHOOK_ENV} must be" in capsys.readouterr().err


def test_a_refusal_is_reported_at_once_without_retrying(monkeypatch):
    """The stack's Prefect runs on PostgreSQL, which does not answer writes with 503 the
    way SQLite's SQLITE_BUSY did: the alert set-up retries nothing."""
    import urllib.error

    calls = []

    def fake_fetch(url, headers, **kwargs):
        calls.append(url)
        raise urllib.error.HTTPError(url, 503, "Service Unavailable", None, None)

    monkeypatch.setattr(services, "fetch", fake_fetch)
    with pytest.raises(urllib.error.HTTPError, match="Service Unavailable"):
        services.prefect_api("http://127.0.0.1:1/api", {})("/automations/", method="POST")
    assert len(calls) == 1
