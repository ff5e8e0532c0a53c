"""The `tlcm` flow: all stages (parameter `stages`), in process or each as its own deployment run."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from tasks.stages import PrefectReporter, stage_task
from tlcm_core.config import PipelineConfig, resolve_config
from tlcm_core.errors import UserError
from tlcm_core.pipeline import open_store, plan_run
from tlcm_core.report import build_report


def publish_summary(cfg: PipelineConfig, results: list[dict], ran_here: bool) -> None:
    """The run's UI artifacts: a table of stage artifacts (cache hit or computed, URI), the final metrics table
    (unless the evaluate stage already published it in this flow run: computed here, not cached) and, when the run
    evaluated, the run report (tlcm_core/report.py), saved beside the artifacts and shown with its images."""
    name = cfg.name
    lines = ["| stage | cached | artifact |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {'yes' if r['cached'] else 'no'} | `{r['uri']}` |" for r in results]
    create_markdown_artifact("\n".join(lines), key="tlcm-stages", description=f"tlcm {name}: stage artifacts")
    ev = next((r for r in results if r["stage"] == "evaluate"), None)
    if ev and ev["summary"].get("rows") and (ev["cached"] or not ran_here):
        PrefectReporter(bars=False).table("metrics", ev["summary"]["rows"],
                                          description=f"evaluate ({'cache hit' if ev['cached'] else 'computed'}): "
                                                      f"{ev['uri']}")
    if ev is None:
        return
    try:  # a view of committed artifacts: a store that refuses the read or write must not fail the run's work
        store = open_store(cfg)
        report = build_report(cfg, store, results)
    except UserError as e:
        get_run_logger().warning(f"no run report: {e}")
        return
    where = "not saved"
    try:
        where = report.save(store)
    except UserError as e:
        get_run_logger().warning(f"run report not saved to the store: {e}")
    create_markdown_artifact(report.inline_markdown(), key="tlcm-report",
                             description=f"tlcm {name}: run report ({where})")


@flow(name="tlcm", log_prints=True)
def tlcm(config: str | dict[str, Any] = "toy", store: str | None = None, stages: list[str] | None = None,
         force: list[str] | None = None, overrides: list[str] | None = None, bars: bool = False,
         shards: list[int] | None = None, dispatch: str | None = None) -> list[dict]:
    """Run the TLCM pipeline's `stages` (default: the config's) and return each stage's artifact URI + summary.

    config: a preset (toy, toy-fast, sdxl, sd15), a YAML path, or a resolved config dict.
    store: artifact store URL (a folder, or s3://bucket/prefix); overrides store.url.
    force: stages to recompute, with everything downstream of them.
    overrides: `section.field=value` items, as `tlcm distill --set`.
    shards: with a single sharded stage (teacher-/lcd-trajectories), compute only these shards, do not commit
        (how `dispatch: deployments` fans one stage out over several workers).
    dispatch: `local` or `deployments`; overrides the config's `dispatch` (the per-stage deployments pin
        `local`, so a stage run never dispatches again).

    A run whose every stage was a cache hit ends in a Completed state named `Cached`.
    """
    logger = get_run_logger()
    cfg = resolve_config(config, store, overrides, dispatch)
    # stage names, fingerprints, what later stages need, store access: all before the first stage starts
    run = plan_run(cfg, stages, force, access="read" if cfg.dispatch == "deployments" and shards is None else "write")
    todo, forced = run.todo, run.forced
    if shards is not None and len(todo) != 1:
        raise ValueError(f"shards={shards} needs exactly one (sharded) stage, got {todo}")
    resolved = cfg.model_dump(mode="json")
    if cfg.dispatch == "deployments" and shards is None:
        from flows.dispatch import run_stages_as_deployments

        results = run_stages_as_deployments(resolved, todo, forced)
    else:
        results = []
        for s in todo:  # sequential: each stage reads what the previous one wrote
            # a cache hit finishes in a Completed state named "Cached"; its data is the same dict
            state = stage_task(s, resolved, force=s in forced, bars=bars, shards=shards, return_state=True)
            results.append(state.result())
    if shards is not None:  # part of a fanned-out stage: the final run reports the artifact
        logger.info(f"{todo[0]}: shards {shards} written to {results[0]['uri']} (committed by the final run)")
        return results
    publish_summary(cfg, results, ran_here=cfg.dispatch != "deployments")
    for r in results:
        logger.info(f"{r['stage']}: {'cache hit' if r['cached'] else 'computed'} -> {r['uri']}")
    if results and all(r["cached"] for r in results):
        # visible in the UI and to a dispatcher that ran this flow as a deployment (flows/dispatch.py)
        return Completed(data=results, name="Cached", message=f"cache hit: {', '.join(r['stage'] for r in results)}")
    return results
