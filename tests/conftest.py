from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every test that runs flows; it takes
    seconds to start, so the whole session shares it. Not autouse: tests that run no flow
    do not pay for it."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.testing.utilities import prefect_test_harness

    # Prefect configures logging at its first flow run and binds its console handler to
    # whatever sys.stderr is then; if that is a test's capsys stream, later tests log to a
    # closed file. Configure it now, against the session's stderr.
    ensure_logging_setup()
    # The server subprocess inherits the environment: no telemetry calls from a sandbox,
    # and none racing the harness's first writes to SQLite ("database is locked").
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with prefect_test_harness(server_startup_timeout=120):
            yield
