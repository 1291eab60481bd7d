"""Failure alerts on the local stack: `up` applied the automation of infra/automations.yaml
and started the receiver on 127.0.0.1; a score-competition run whose input does not exist
fails on a worker, and the receiver gets exactly one alert, naming the run, its error and
its page in the Prefect UI.

The stack is the session's (`stack` in tests/conftest.py); the modules before this one
may have left alerts of their own runs in the receiver's file, so only this run's count.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUTOMATION = "cifar-pipeline-run-failed"


def _alerts_for(path, flow_run_id: str) -> list[dict]:
    if not path.exists():
        return []
    alerts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [a for a in alerts if isinstance(a, dict) and a.get("flow_run_id") == flow_run_id]


def _a_failed_run(tmp_path):
    """A score-competition run on a worker that fails: its input does not exist."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    missing = tmp_path / "no-such-competition-file.pkl"
    run = run_deployment("score-competition/score-competition", timeout=0, parameters={
        "config": {"input_uri": str(missing), "tta": False, "device": "cpu"}})
    deadline = time.monotonic() + 180
    with get_client(sync_client=True) as client:
        while not (done := client.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, f"run {run.id} still {done.state.name}"
            time.sleep(1)
    assert done.state.is_failed(), done.state
    assert missing.name in done.state.message
    return done


def test_a_failed_run_posts_exactly_one_alert_naming_the_run_its_error_and_its_link(
        stack, tmp_path, monkeypatch):
    from prefect import get_client

    from infra import provision
    from infra.services import Stack, fetch

    local = Stack.load(stack["state"] / "stack")
    monkeypatch.delenv("CIFAR_ALERT_WEBHOOK_URL", raising=False)
    # What a second `up` does: the automation is updated in place, not added again.
    provision.ensure_alerts(local)
    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name(AUTOMATION)) == 1

    run = done = _a_failed_run(tmp_path)

    deadline = time.monotonic() + 60
    while not (found := _alerts_for(local.root / "alerts.jsonl", str(run.id))):
        assert time.monotonic() < deadline, "no alert reached the receiver in 60 s"
        time.sleep(0.5)
    alert = found[0]
    url = f"{local.prefect_url}/runs/flow-run/{run.id}"
    assert alert["flow"] == "score-competition" and alert["state"] == "Failed"
    assert alert["flow_run"] == done.name
    assert alert["message"] == done.state.message
    assert alert["url"] == url
    for part in (done.name, done.state.message, url):
        assert part in alert["text"]
    # The link opens the run's page: the UI answers a browser's request for it.
    assert b"<html" in fetch(url, {"Accept": "text/html"}, timeout=10)[:2000].lower()
    print("alert:", json.dumps(alert, indent=2))

    time.sleep(5)  # a second automation, or a retrigger, would have posted by now
    assert len(_alerts_for(local.root / "alerts.jsonl", str(run.id))) == 1


def test_an_alert_that_a_webhook_never_answers_is_reported_by_stack_status(
        stack, tmp_path, monkeypatch):
    """The webhook accepts the connection and never answers: Prefect gives up after its
    client's timeout and records that only as an event, which `stack status` reports."""
    from infra import provision
    from infra.services import Stack

    local = Stack.load(stack["state"] / "stack")
    silent = socket.create_server(("127.0.0.1", 0))  # listens; nobody ever answers
    monkeypatch.setenv("CIFAR_ALERT_WEBHOOK_URL",
                       f"http://127.0.0.1:{silent.getsockname()[1]}/hook")
    provision.ensure_alerts(local)
    try:
        _a_failed_run(tmp_path)
        deadline = time.monotonic() + 90
        while "not delivered" not in (status := subprocess.run(
                [*stack["cmd"], "status", "--state-dir", str(stack["state"])],
                env=stack["env"], capture_output=True, text=True, timeout=60)).stdout:
            assert time.monotonic() < deadline, status.stdout
            time.sleep(2)
    finally:
        monkeypatch.delenv("CIFAR_ALERT_WEBHOOK_URL")
        provision.ensure_alerts(local)  # back to the stack's receiver
        silent.close()
    (line,) = [li for li in status.stdout.splitlines() if "not delivered" in li]
    assert " not delivered in the last day; the last at " in line and "Timeout" in line, line
    assert status.returncode == 0  # the services are healthy; the alert is what failed
