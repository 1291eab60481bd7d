"""Training started the way most users start it: from the Prefect UI's custom-run form.

A real browser opens the default Prefect UI of the local stack, goes to the `train-resnets`
deployment, chooses Run -> Custom run and fills the form through its fields (the JSON
editor is never opened): light only, 1 epoch, a few hundred images of the shared Parquet,
pool dispatch. The run it submits must complete, through a child on the `gpu` pool, with
one new version in the MLflow registry. Screenshots of the filled form and of the finished
run go to test-output/.

The stack is the session's (`stack` in tests/conftest.py); this module only counts the
registry's versions before and after, so it runs on a stack in any state.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest

from tests.conftest import SHARED_PARQUET, stack_browser_page

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PARQUET = SHARED_PARQUET.resolve()  # as the UI's form shows it
OUTPUT = REPO / "test-output"
CHROMIUM = Path("/usr/bin/chromium")
# What the form is filled with; the run's parameters must come back as exactly these.
FILLED = {"variants": ["light"], "epochs": 1, "batch_size": 64, "train_size": 256,
          "val_size": 128, "data_source": str(PARQUET), "dispatch": "pool"}
UI_TIMEOUT_MS = 60_000  # a loaded 2-core machine renders the form in seconds, not minutes


def _field(page, title: str):
    """The form field titled `title`: its label, description and input(s). Optional fields
    (every field of a form whose parameter has a default) are titled `<Title> (Optional)`."""
    label = page.get_by_text(f"{title} (Optional)", exact=True)
    return label.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' group ')][1]")


def _fill_number(page, title: str, value: int, optional_type: str | None = None) -> None:
    """A number field; an `int | None` one first switches from its None tab to `int`."""
    field = _field(page, title)
    if optional_type:
        field.get_by_role("tab", name=optional_type, exact=True).click()
    field.get_by_role("spinbutton").fill(str(value))


def _choose(page, title: str, option: str) -> None:
    page.get_by_role("button", name=f"Select {title}").click()
    page.get_by_role("option", name=option, exact=True).click()


def _fill_custom_run_form(page) -> None:
    from playwright.sync_api import expect

    page.get_by_text("Train Size (Optional)", exact=True).wait_for(timeout=UI_TIMEOUT_MS)
    source = _field(page, "Data Source")
    source.get_by_role("tab", name="str", exact=True).click()
    source.get_by_role("textbox").fill(FILLED["data_source"])
    _fill_number(page, "Val Size", FILLED["val_size"])
    _fill_number(page, "Train Size", FILLED["train_size"], optional_type="int")
    _fill_number(page, "Epochs", FILLED["epochs"], optional_type="int")
    _fill_number(page, "Batch Size", FILLED["batch_size"], optional_type="int")
    # Variants: a multi-select whose chosen values show as removable tags.
    variants = _field(page, "Variants")
    remove_deep = variants.get_by_role("button", name="Remove deep tag")
    if remove_deep.count():
        remove_deep.click()
    if not variants.get_by_role("button", name="Remove light tag").count():
        _choose(page, "Variants", "light")
        page.keyboard.press("Escape")
    expect(variants.locator("[data-slot=badge]")).to_have_text(["light"], timeout=UI_TIMEOUT_MS)
    _choose(page, "Dispatch", "pool")
    expect(page.get_by_role("button", name="Select Dispatch")).to_have_text(
        "pool", timeout=UI_TIMEOUT_MS)


def _versions() -> dict[str, dict[str, str]]:
    import mlflow

    found = mlflow.MlflowClient().search_model_versions("name='cifar10-resnet'")
    return {v.version: dict(v.tags) for v in found}


def _submit_custom_run(page, prefect_ui: str, deployment_id) -> tuple[str, str]:
    """Run -> Custom run on the deployment's page, the form filled, submitted: the new flow
    run's id, and the base URL of the UI version the browser was sent to."""
    # The UI a user lands on (its default version), then its own navigation.
    page.goto(f"{prefect_ui}/")
    page.get_by_role("link", name="Deployments", exact=True).first.click()
    # The flow and its deployment share the name: follow the deployment's link.
    page.locator(f"a[href*='/deployments/deployment/{deployment_id}']").first.click()
    page.wait_for_url(f"**/deployments/deployment/{deployment_id}**")
    ui_base = page.url.split("/deployments/")[0]
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()
    _fill_custom_run_form(page)
    page.screenshot(path=OUTPUT / "prefect-custom-run-form.png", full_page=True)
    # One submit, as a user makes it: the stack's Prefect runs on PostgreSQL, so a write
    # beside others gets no 503.
    with page.expect_response(lambda r: r.request.method == "POST"
                              and r.url.endswith("/create_flow_run")) as created:
        page.get_by_role("button", name="Submit", exact=True).click()
    assert created.value.ok, f"{created.value.status}: " + created.value.text()
    return created.value.json()["id"], ui_base


def _screenshot_finished(page, ui_base: str, run, jobs) -> None:
    """The finished run's page: its state, its graph, and the children the pool ran."""
    page.goto(f"{ui_base}/runs/flow-run/{run.id}")
    page.get_by_text(run.name, exact=True).first.wait_for()
    page.get_by_text("Completed", exact=True).first.wait_for()
    page.get_by_role("tab", name="Subflow Runs").click()
    for job in jobs:
        page.get_by_role("link", name=job.name).wait_for()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=OUTPUT / "prefect-custom-run-finished.png")


def test_a_custom_run_filled_in_the_prefect_ui_trains_and_registers_a_version(stack):
    import os

    from playwright import sync_api as playwright
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.flow_runs import wait_for_flow_run
    from prefect.utilities.asyncutils import run_coro_as_sync

    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: ./setup.sh installs it with apt-get")
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "prefect-custom-run-error.png").unlink(missing_ok=True)
    before = _versions()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train-resnets/train-resnets")
    prefect_ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    with playwright.sync_playwright() as p:
        browser, page = stack_browser_page(p, os.environ)
        page.set_default_timeout(UI_TIMEOUT_MS)
        try:
            run_id, ui_base = _submit_custom_run(page, prefect_ui, deployment.id)
            # Prefect's own wait (server events, not polling), at most 10 minutes.
            run = run_coro_as_sync(wait_for_flow_run(UUID(run_id), timeout=600))
            with get_client(sync_client=True) as client:
                children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            jobs = [c for c in children if c.deployment_id is not None]
            _screenshot_finished(page, ui_base, run, jobs)
        except Exception:
            # What the browser showed when it went wrong, for whoever reads the failure.
            page.screenshot(path=OUTPUT / "prefect-custom-run-error.png", full_page=True)
            raise
        finally:
            browser.close()

    assert run.state.is_completed(), run.state.message
    # The form's fields, and nothing typed as JSON, made these parameters.
    config = run.parameters["config"]
    assert {k: config.get(k) for k in FILLED} == FILLED, config
    # Pool dispatch: one child on the train-variant deployment, which registered the version.
    assert len(jobs) == 1 and jobs[0].state.is_completed(), [c.name for c in children]
    after = _versions()
    new = {v: tags for v, tags in after.items() if v not in before}
    assert len(after) == len(before) + 1 and len(new) == 1, (sorted(before), sorted(after))
    (tags,) = new.values()
    assert tags["variant"] == "light" and tags["prefect_flow_run_id"] == str(jobs[0].id), tags
    for name in ("prefect-custom-run-form.png", "prefect-custom-run-finished.png"):
        assert (OUTPUT / name).stat().st_size > 0
