"""The parent's wait for its children on the pool, on a fake clock and a fake Prefect
client: children queued behind running siblings wait, a pool that takes nothing fails."""

from __future__ import annotations

import logging
import types
import uuid

import pytest
from prefect.states import Completed, Running, Scheduled

from tasks import dispatch

CONFIG = dispatch.PoolOptions("train-variant/train-variant", 900, 86_400)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeClient:
    """Each child's state is a function of the clock; cancellations are recorded."""

    def __init__(self, clock: FakeClock, timelines: dict[str, list[tuple[float, object]]]):
        self.clock = clock
        self.ids = {name: uuid.uuid4() for name in timelines}
        self.timelines = {self.ids[name]: steps for name, steps in timelines.items()}
        self.cancelled: list[str] = []
        self.names = {run_id: name for name, run_id in self.ids.items()}

    def read_flow_run(self, run_id):
        state = None
        for since, make in self.timelines[run_id]:
            if self.clock.now >= since:
                state = make()
        return types.SimpleNamespace(state=state)

    def set_flow_run_state(self, run_id, state, force=False):
        assert state.is_cancelled() and force
        self.cancelled.append(self.names[run_id])

    def read_workers_for_work_pool(self, pool):
        return []


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(dispatch, "time", fake)
    return fake


def wait(client: FakeClient):
    children = {name: (None, run_id) for name, run_id in client.ids.items()}
    return dispatch._wait(client, children, "gpu", CONFIG, logging.getLogger("test"))


def test_a_child_queued_behind_a_long_running_sibling_waits_for_it(clock: FakeClock) -> None:
    # One GPU, two jobs: the second is Scheduled for 2,000 s, past the start deadline.
    client = FakeClient(clock, {
        "light-seed0": [(0, Running), (2000, Completed)],
        "light-seed1": [(0, Scheduled), (2000, Running), (2100, Completed)],
    })
    states = wait(client)
    assert all(state.is_completed() for state in states.values())
    assert client.cancelled == []
    assert clock.now >= 2100


def test_children_no_worker_starts_fail_the_parent_after_the_start_deadline(
        clock: FakeClock) -> None:
    client = FakeClient(clock, {"deep-seed0": [(0, Scheduled)], "light-seed0": [(0, Scheduled)]})
    with pytest.raises(dispatch.DispatchError, match="no worker is polling it") as failure:
        wait(client)
    assert "work pool 'gpu'" in str(failure.value)
    assert 900 < clock.now <= 900 + 2 * dispatch.POLL_SECONDS
    assert sorted(client.cancelled) == ["deep-seed0", "light-seed0"]


def test_the_start_deadline_counts_from_the_last_child_that_ended(clock: FakeClock) -> None:
    client = FakeClient(clock, {
        "deep-seed0": [(0, Running), (500, Completed)],
        "light-seed0": [(0, Scheduled)],
    })
    with pytest.raises(dispatch.DispatchError, match="light-seed0 did not start"):
        wait(client)
    assert 1400 < clock.now <= 1400 + 2 * dispatch.POLL_SECONDS
    assert client.cancelled == ["light-seed0"]  # the finished one is left as it is


def test_the_whole_wait_is_bounded(clock: FakeClock) -> None:
    client = FakeClient(clock, {"deep-seed0": [(0, Running)]})
    with pytest.raises(dispatch.DispatchError, match="did not all finish within 86400 s"):
        wait(client)
    assert client.cancelled == ["deep-seed0"]
