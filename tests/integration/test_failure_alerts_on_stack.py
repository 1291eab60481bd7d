"""Failure alerts on the local stack: `up` applied the automation of infra/automations.yaml
and started the receiver on 127.0.0.1; a score-competition run whose input does not exist
fails on a worker, and the receiver gets exactly one alert, naming the run, its error and
its page in the Prefect UI.

The stack is the session's (`stack` in tests/conftest.py); the modules before this one
may have left alerts of their own runs in the receiver's file, so only this run's count.
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUTOMATION = "cifar-pipeline-run-failed"


def _alerts_for(path, flow_run_id: str) -> list[dict]:
    if not path.exists():
        return []
    alerts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [a for a in alerts if isinstance(a, dict) and a.get("flow_run_id") == flow_run_id]


def test_a_failed_run_posts_exactly_one_alert_naming_the_run_its_error_and_its_link(
        stack, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.deployments import run_deployment

    from infra import provision
    from infra.services import Stack, fetch

    local = Stack.load(stack["state"] / "stack")
    monkeypatch.delenv("CIFAR_ALERT_WEBHOOK_URL", raising=False)
    # What a second `up` does: the automation is updated in place, not added again.
    provision.ensure_alerts(local)
    with get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name(AUTOMATION)) == 1

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

    deadline = time.monotonic() + 60
    while not (found := _alerts_for(local.alerts_file, str(run.id))):
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
    assert len(_alerts_for(local.alerts_file, str(run.id))) == 1
