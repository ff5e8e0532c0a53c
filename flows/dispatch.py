"""`dispatch: deployments`: each stage as its own deployment run (`tlcm/<stage>`), handing over only URIs.

The stage runs compute the same fingerprints from the same resolved config, so the only thing that travels
is the config; results come back as the artifacts' manifests in the store, never as Prefect results.

1. A stage whose artifact is already complete is a cache hit: it is verified here and not dispatched (no
   worker, pod or GPU is taken just to say "cached").
2. Otherwise it runs as a deployment run of `tlcm/<stage>`, linked to this flow run as a subflow. The run
   ends in a Completed state named `Cached` when its stage turned out complete after all (another worker or
   pipeline committed it meanwhile): that is what `cached` reports then.
3. A sharded stage (`teacher-trajectories`; also `lcd-trajectories`) with `shard_runs: N > 1` fans out: its
   shards are split into N groups, each a `tlcm/<stage>` run with the `shards` parameter (they run at once
   on whatever workers are free and write disjoint chunk-aligned regions), then one final run without
   `shards` fills any gap left by a failed shard run and commits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from tlcm_core.config import validate_config
from tlcm_core.pipeline import num_shards, open_store, plan_run
from tlcm_core.shard_processes import split_shards
from tlcm_core.stages import REGISTRY
from tlcm_core.store import CorruptArtifactError, IncompleteArtifactError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

CACHED_STATE = "Cached"  # the state name flows/tlcm.py and tasks/stages.py give a cache hit
# Stages whose shard runs must wait for a first run's shared set-up (marker name). None today: the pair stages'
# text conditioning is written idempotently (identical, chunk-atomic writes; each run writes every chunk itself
# before it reads), so shard runs may start together.
SHARED_SETUP_MARKER: dict[str, str] = {}


class StageRunFailed(RuntimeError):
    pass


def _run_name(stage: str, shards: list[int] | None) -> str:
    """`<this run's name>-<stage>[-shards-a-b]`: the stage runs group under their orchestrator in the UI."""
    parent = flow_run.name or "tlcm"
    suffix = "" if shards is None else (f"-shard-{shards[0]}" if len(shards) == 1 else f"-shards-{shards[0]}-{shards[-1]}")
    return f"{parent}-{stage}{suffix}"


class StageDispatcher:
    """Starts `flow_name/<stage>` deployment runs and waits for them (polling the API every `poll_s`)."""

    def __init__(self, resolved: dict, flow_name: str = "tlcm", poll_s: float = 1.0, timeout: float | None = None,
                 log: Callable[[str], None] | None = None):
        self.local = dict(resolved, dispatch="local")  # a dispatched stage never dispatches again
        self.flow_name = flow_name
        self.poll_s = poll_s
        self.timeout = timeout
        self.log = log or (lambda m: None)
        self.note_every_s = 300.0

    def start(self, stage: str, force: bool = False, shards: list[int] | None = None) -> FlowRun:
        params = {"config": self.local, "stages": [stage], "force": [stage] if force else None, "shards": shards,
                  "dispatch": "local"}
        run = run_deployment(f"{self.flow_name}/{stage}", parameters=params, timeout=0, as_subflow=True,
                             flow_run_name=_run_name(stage, shards))
        self.log(f"{stage}: started deployment run {run.name} of {self.flow_name}/{stage}"
                 + (f" (shards {shards[0]}..{shards[-1]})" if shards else ""))
        return run

    def wait(self, runs: list[FlowRun], until: Callable[[], bool] | None = None) -> list[FlowRun]:
        """Poll until every run is final (or `until()` is true); returns the runs as last read."""
        latest = {r.id: r for r in runs}
        start = last_note = time.monotonic()
        with get_client(sync_client=True) as client:
            while True:
                for rid, r in latest.items():
                    if not (r.state and r.state.is_final()):
                        latest[rid] = client.read_flow_run(rid)
                if all(r.state and r.state.is_final() for r in latest.values()) or (until and until()):
                    return [latest[r.id] for r in runs]
                waiting = ", ".join(f"{r.name} ({r.state.name if r.state else '?'})" for r in latest.values()
                                    if not (r.state and r.state.is_final()))
                now = time.monotonic()
                if self.timeout is not None and now - start > self.timeout:
                    raise StageRunFailed(f"deployment runs not finished after {self.timeout} s: {waiting}")
                if now - last_note > self.note_every_s:  # e.g. Scheduled/Late: no worker serves the queue
                    self.log(f"waiting for {waiting}")
                    last_note = now
                time.sleep(self.poll_s)

    def run(self, stage: str, force: bool = False) -> FlowRun:
        (run,) = self.wait([self.start(stage, force=force)])
        return run


def _failed(stage: str, run: FlowRun) -> StageRunFailed:
    state = run.state
    return StageRunFailed(f"stage {stage}: deployment run {run.name} ({run.id}) ended "
                          f"{state.name if state else 'without a state'}"
                          + (f": {state.message}" if state and state.message else "")
                          + "; its logs are in the Prefect UI under that flow run")


def run_stages_as_deployments(resolved: dict, stages: list[str], forced: set[str], flow_name: str = "tlcm",
                              timeout: float | None = None, poll_s: float = 1.0) -> list[dict]:
    """Run `stages` in order, each complete-or-dispatched; returns {stage, uri, fingerprint, cached, summary,
    flow_run} per stage (`flow_run`: the deployment runs' ids, empty for a cache hit found here)."""
    logger = get_run_logger()
    cfg = validate_config(dict(resolved), source="flow parameter")
    # this process only reads manifests: the same checks as every entry point, with read access
    p, store = plan_run(cfg, stages, access="read").plan, open_store(cfg)
    d = StageDispatcher(resolved, flow_name=flow_name, poll_s=poll_s, timeout=timeout, log=logger.info)
    results = []
    for s in stages:
        art = store.artifact(s, p[s].fingerprint)
        force = s in forced
        if not force and art.exists():
            try:
                m = art.manifest(verify=cfg.store.verify)
            except CorruptArtifactError as e:
                raise CorruptArtifactError(f"{e}\nThe artifact will not be used; rerun with force=['{s}'] to "
                                           "recompute it.") from None
            logger.info(f"{s}: cache hit {art.uri} (not dispatched)")
            results.append({"stage": s, "uri": art.uri, "fingerprint": p[s].fingerprint, "cached": True,
                            "summary": m.summary, "flow_run": []})
            continue
        runs: list[FlowRun] = []
        if REGISTRY[s].sharded and cfg.shard_runs > 1 and num_shards(cfg, s) > 1:
            if force and art.exists():
                art.discard()  # here, once: a forced shard run would discard its siblings' work
                logger.info(f"{s}: force: discarded {art.uri}")
                force = False
            groups = split_shards(num_shards(cfg, s), cfg.shard_runs)
            first = d.start(s, shards=groups[0])
            marker = SHARED_SETUP_MARKER.get(s)
            if marker and len(groups) > 1:
                d.wait([first], until=lambda: art.is_done(marker))
            shard_runs = [first] + [d.start(s, shards=g) for g in groups[1:]]
            for r in d.wait(shard_runs):
                if not r.state.is_completed():
                    # not fatal: the final run below computes whatever this run left missing
                    logger.warning(f"{s}: shard run {r.name} ended {r.state.name}; the final run fills its gap")
                runs.append(r)
        final = d.run(s, force=force)
        runs.append(final)
        if not final.state or not final.state.is_completed():
            raise _failed(s, final)
        try:
            m = art.manifest(verify="size")  # the stage run verified what it wrote or found
        except IncompleteArtifactError:
            raise StageRunFailed(f"stage {s}: deployment run {final.name} completed but {art.uri} has no manifest; "
                                 f"do the worker and this flow use the same store ({store.url})?") from None
        cached = final.state.name == CACHED_STATE
        logger.info(f"{s}: {'cache hit' if cached else 'computed'} by {final.name} -> {art.uri}")
        results.append({"stage": s, "uri": art.uri, "fingerprint": p[s].fingerprint, "cached": cached,
                        "summary": m.summary, "flow_run": [str(r.id) for r in runs]})
    return results
