"""Prefect flows: `tlcm` runs any subset of the stages; deployments are declared in deploy/prefect.yaml.

Importing this package gives Prefect's temporary API server a slow machine's start-up budget (see
`prefect_startup_env`), so a first local run on a busy laptop does not fail before any work.
"""

from __future__ import annotations

import os

EPHEMERAL_STARTUP_TIMEOUT_S = 180  # measured: 27-32 s on a busy 2-core machine with a fresh PREFECT_HOME (default 20)


def prefect_startup_env(env=os.environ) -> None:
    """With no Prefect API configured (no PREFECT_API_URL), Prefect starts a temporary API server as a child process
    and fails the run if it does not answer within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: give it a slow
    machine's budget unless the user set one. Prefect reads its settings once, on import, so this runs when the
    package is imported, before any flow module imports Prefect."""
    if not env.get("PREFECT_API_URL"):
        env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))


prefect_startup_env()
