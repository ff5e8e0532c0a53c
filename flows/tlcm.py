"""The `tlcm` flow: all stages (parameter `stages`), in process or each as its own deployment run."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.stages import stage_task
from tlcm_core.config import PipelineConfig, apply_overrides, load_config, validate_config
from tlcm_core.pipeline import plan


def resolve_config(config: str | dict[str, Any], store: str | None = None,
                   overrides: list[str] | None = None) -> PipelineConfig:
    """A preset name, a YAML path, or an already-resolved config dict; then `store` and `--set` overrides."""
    extra = list(overrides or []) + ([f"store.url={store}"] if store else [])
    if isinstance(config, dict):
        return validate_config(apply_overrides(config, extra), source="flow parameter")
    return load_config(config, extra)


@flow(name="tlcm", log_prints=True)
def tlcm(config: str | dict[str, Any] = "toy", store: str | None = None, stages: list[str] | None = None,
         force: list[str] | None = None, overrides: list[str] | None = None, bars: bool = False,
         shards: list[int] | None = None) -> list[dict]:
    """Run the TLCM pipeline's `stages` (default: the config's) and return each stage's artifact URI + summary.

    config: a preset (toy, toy-fast, sdxl, sd15), a YAML path, or a resolved config dict.
    store: artifact store URL (a folder, or s3://bucket/prefix); overrides store.url.
    force: stages to recompute, with everything downstream of them.
    overrides: `section.field=value` items, as `tlcm distill --set`.
    shards: with a single sharded stage (teacher-trajectories), compute only these shards and do not commit
        (how `dispatch: deployments` fans one stage out over several workers).
    """
    logger = get_run_logger()
    cfg = resolve_config(config, store, overrides)
    p = plan(cfg)  # validates stage names and computes every fingerprint before any work
    todo = [s for s in p.stages if s in (stages or cfg.stages)]
    if shards is not None and len(todo) != 1:
        raise ValueError(f"shards={shards} needs exactly one (sharded) stage, got {todo}")
    forced: set[str] = set()
    for f in force or []:
        forced.update(p.dependents(f))
    resolved = cfg.model_dump(mode="json")
    if cfg.dispatch == "deployments":
        from flows.dispatch import run_stages_as_deployments

        results = run_stages_as_deployments(resolved, todo, forced)
    else:
        results = []
        for s in todo:  # sequential: each stage reads what the previous one wrote
            # a cache hit finishes in a Completed state named "Cached"; its data is the same dict
            state = stage_task(s, resolved, force=s in forced, bars=bars, shards=shards, return_state=True)
            results.append(state.result())
    lines = ["| stage | cached | artifact |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {'yes' if r['cached'] else 'no'} | `{r['uri']}` |" for r in results]
    create_markdown_artifact("\n".join(lines), key="tlcm-stages", description=f"tlcm {cfg.name}: stage artifacts")
    for r in results:
        logger.info(f"{r['stage']}: {'cache hit' if r['cached'] else 'computed'} -> {r['uri']}")
    return results
