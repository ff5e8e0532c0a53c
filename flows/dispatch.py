"""`dispatch: deployments`: each stage as its own deployment run (`tlcm/<stage>`), handing over only URIs."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.deployments import run_deployment


class StageRunFailed(RuntimeError):
    pass


def run_stages_as_deployments(resolved: dict, stages: list[str], forced: set[str],
                              flow_name: str = "tlcm", timeout: float | None = None) -> list[dict]:
    """Run stages in order, each as a deployment run of `tlcm/<stage>` on whatever worker picks it up.

    The stage runs compute the same fingerprints from the same resolved config, so the only thing that
    travels is the config; the results come back as the artifacts' manifests in the store.
    """
    from tlcm_core.config import validate_config
    from tlcm_core.pipeline import open_store, plan

    logger = get_run_logger()
    cfg = validate_config(dict(resolved), source="flow parameter")
    p, store = plan(cfg), open_store(cfg)
    local = dict(resolved, dispatch="local")
    results = []
    for s in stages:
        params = {"config": local, "stages": [s], "force": [s] if s in forced else None}
        logger.info(f"dispatching {s} to deployment {flow_name}/{s}")
        run = run_deployment(f"{flow_name}/{s}", parameters=params, timeout=timeout, as_subflow=True)
        if not run.state or not run.state.is_completed():
            raise StageRunFailed(f"stage {s}: deployment run {run.name} ended {run.state.name if run.state else '?'}")
        art = store.artifact(s, p[s].fingerprint)
        m = art.manifest(verify="size")
        results.append({"stage": s, "uri": art.uri, "fingerprint": p[s].fingerprint,
                        "cached": False, "summary": m.summary, "flow_run": str(run.id)})
    return results
