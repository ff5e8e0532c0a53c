"""The front door: plan a run (stage names, fingerprints, forced closures, preflight, store access) and run stages.

Each stage is declared once, in its module under tlcm_core/stages/ (tlcm_core/stage.py says what a declaration
holds). A stage's fingerprint hashes the config its declaration reads, its inputs' fingerprints and its version
(docs/artifacts.md). Fingerprints depend on the config alone, so any worker can find any artifact without
running anything: `tlcm/mlcd` on its own locates the cached trajectories.

The CLI, the Prefect flow, deployment dispatch and `run_pipeline` all start with `plan_run`, so they check the
same things in the same order before any model work.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import STAGES, PipelineConfig
from .errors import UserError
from .lease import artifact_lease
from .progress import Reporter
from .stage import Stage, StageContext, StageInputError, config_slice, config_view
from .stages import REGISTRY
from .store import ArtifactStore, CorruptArtifactError, IncompleteArtifactError, fingerprint

log = logging.getLogger("tlcm")

__all__ = ["Plan", "PlannedStage", "RunPlan", "StageInputError", "StageResult", "open_store", "plan", "plan_run",
           "preflight", "run_pipeline", "run_stage", "stage_inputs"]


class PlanError(UserError, ValueError):
    """A stage name or --force that does not fit the configured pipeline."""


@dataclass
class PlannedStage:
    name: str
    fingerprint: str
    inputs: dict[str, str]  # input name -> upstream stage
    config: dict[str, Any]
    version: int


@dataclass
class Plan:
    stages: dict[str, PlannedStage] = field(default_factory=dict)

    def __getitem__(self, name: str) -> PlannedStage:
        return self.stages[name]

    def dependents(self, name: str) -> list[str]:
        """`name` and every planned stage downstream of it."""
        out = [name]
        for s in self.stages.values():
            if any(up in out for up in s.inputs.values()) and s.name not in out:
                out.append(s.name)
        return [s for s in STAGES if s in out]


def plan(cfg: PipelineConfig) -> Plan:
    """Fingerprints for every stage the config's pipeline needs (its stages plus their inputs)."""
    p, derived = Plan(), {}

    def visit(name: str) -> PlannedStage:
        if name in p.stages:
            return p.stages[name]
        stage = REGISTRY[name]
        try:
            inputs = stage.inputs(cfg)
        except ValueError as e:
            raise PlanError(str(e)) from None
        fps = {k: visit(up).fingerprint for k, up in inputs.items()}
        conf = config_slice(stage, cfg, derived)
        ps = PlannedStage(name, fingerprint(name, stage.version, conf, fps), inputs, conf, stage.version)
        p.stages[name] = ps
        return ps

    for s in cfg.stages:
        visit(s)
    p.stages = {s: p.stages[s] for s in STAGES if s in p.stages}
    return p


@dataclass
class RunPlan:
    """What a run will do, checked before any model work: the stages in order, which are forced, the plan."""

    cfg: PipelineConfig
    plan: Plan
    todo: list[str]
    forced: set[str]


def plan_run(cfg: PipelineConfig, stages: list[str] | None = None, force: list[str] | None = None,
             access: Literal["write", "read", "none"] = "write") -> RunPlan:
    """Validate stage names and --force against the pipeline, plan every fingerprint, run the preflight checks of
    what the stages will use and probe the store (`access`: what this process will do there; a dispatcher only
    reads manifests). Whatever is wrong is one clear error before any model work."""
    named = [("--stages", s) for s in stages or []] + [("--force", s) for s in force or []]
    for flag, s in named:  # the cheap checks first: planning reads the prompts and hashes the teacher
        if s not in STAGES:
            raise PlanError(f"{flag} {s}: unknown stage {s!r}; stages: {', '.join(STAGES)}")
    if access != "none":
        open_store(cfg).check_access(write=access == "write")
    p = plan(cfg)
    for flag, s in named:
        if s not in p.stages:
            raise PlanError(f"{flag} {s}: stage {s!r} is not part of this config's pipeline ({', '.join(p.stages)}); "
                            "add it to the config's `stages`")
    # the configured pipeline: its stages and the implied stages they take as inputs (teacher-evaluate, latent-lpips)
    todo = [s for s in p.stages if s in stages] if stages else \
        [s for s in p.stages if s in cfg.stages or REGISTRY[s].implied]
    forced: set[str] = set()
    for f in force or []:
        forced.update(p.dependents(f))
    preflight(cfg, todo)
    return RunPlan(cfg, p, todo, forced)


@dataclass
class StageResult:
    stage: str
    uri: str
    fingerprint: str
    cached: bool
    summary: dict

    def as_dict(self) -> dict:
        return {"stage": self.stage, "uri": self.uri, "fingerprint": self.fingerprint, "cached": self.cached,
                "summary": self.summary}


def open_store(cfg: PipelineConfig) -> ArtifactStore:
    return ArtifactStore(cfg.store.url, cfg.store.storage_options or None)


def stage_inputs(cfg: PipelineConfig, store: ArtifactStore, name: str, p: Plan | None = None) -> dict:
    """The complete input artifacts of a stage; a missing one is an error that says which stage to run."""
    p = p or plan(cfg)
    out = {}
    for key, up in p[name].inputs.items():
        art = store.artifact(up, p[up].fingerprint)
        try:
            art.manifest(verify=cfg.store.verify)
        except IncompleteArtifactError:
            raise StageInputError(f"stage {name!r} needs {up!r} at {art.uri}, which is not complete; run stage {up!r} "
                                  "first (or include it in --stages)") from None
        out[key] = art
    return out


def execute(stage: Stage, cfg: PipelineConfig, inputs: dict, out, reporter: Reporter,
            shards: list[int] | None = None) -> dict:
    """Run a stage's code on its declared view of the config: data-parallel for a training stage with
    compute.num_processes (or, for MLCD and LCD on a CPU, compute.cpu_processes) above 1 (launched here, at the stage
    boundary), else in this process. A sharded stage's missing shards are first filled by compute.cpu_processes local
    processes on a CPU (tlcm_core/shard_processes.py); its run in this process then fills any gap."""
    from .models import setup_threads

    setup_threads(cfg.compute)  # compute.num_threads, for this process's stages (a launched process has its share)
    view = config_view(stage, cfg)
    from .distributed import cpu_processes, launch, world_size

    local = cpu_processes(cfg.compute) if stage.sharded and shards is None else 1
    if local > 1:
        from .pairs import shard_marker
        from .shard_processes import fill_in_processes

        total = stage.num_shards(cfg)
        missing = [i for i in range(total) if not out.is_done(shard_marker(i))]
        if len(missing) > 1:  # at most one process per shard
            fill_in_processes(cfg, stage.name, inputs, out, missing, total, min(local, len(missing)), reporter)
    if stage.trains:
        n = world_size(view.compute, stage.splits_on_cpu)
        if n > 1:
            return launch(cfg, stage.name, inputs, out, n, reporter)
    return stage.run(StageContext(view, inputs, out, reporter, shards))


def run_stage(cfg: PipelineConfig, name: str, store: ArtifactStore | None = None, reporter: Reporter | None = None,
              force: bool = False, p: Plan | None = None, shards: list[int] | None = None) -> StageResult:
    """Run one stage unless its artifact is complete (a cache hit). A corrupt artifact is reported, never used.

    `shards` (sharded stages only) computes just those shards and does not commit: several workers can fill
    one artifact in parallel, and a final call without `shards` fills any gap and commits.
    """
    store = store or open_store(cfg)
    reporter = reporter or Reporter()
    p = p or plan(cfg)
    ps, stage = p[name], REGISTRY[name]
    art = store.artifact(name, ps.fingerprint)
    if art.exists() and not force:
        try:
            m = art.manifest(verify=cfg.store.verify)
            reporter.log(f"{name}: cache hit {art.uri}")
            return StageResult(name, art.uri, ps.fingerprint, True, m.summary)
        except CorruptArtifactError as e:
            raise CorruptArtifactError(f"{e}\nThe artifact will not be used; rerun with --force {name} to recompute "
                                       "it.") from None
    if force and art.exists():
        art.discard()
        reporter.log(f"{name}: --force: discarded {art.uri}")
    inputs = stage_inputs(cfg, store, name, p)
    if shards is not None:
        if not stage.sharded:
            raise PlanError(f"stage {name!r} is not sharded; only "
                            f"{', '.join(s for s, st in REGISTRY.items() if st.sharded)} take shards")
        reporter.log(f"{name}: computing shards {shards} of {art.uri}")
        summary = execute(stage, cfg, inputs, art, reporter, shards)
        return StageResult(name, art.uri, ps.fingerprint, False, summary)
    # one worker computes; a concurrent run of the same stage and fingerprint waits and reuses its result
    with artifact_lease(art, done=art.exists, log=reporter.log) as mine:
        if not mine:
            m = art.manifest(verify=cfg.store.verify)
            reporter.log(f"{name}: computed meanwhile by another worker: cache hit {art.uri}")
            return StageResult(name, art.uri, ps.fingerprint, True, m.summary)
        reporter.log(f"{name}: computing {art.uri}")
        t0 = time.perf_counter()
        summary = execute(stage, cfg, inputs, art, reporter)
        summary = {**summary, "wall_seconds": round(time.perf_counter() - t0, 2)}  # this run's work (not resumed)
        mine.check()  # another worker took over (our heartbeats stalled): it commits, not us
        art.commit(version=ps.version, config=ps.config, inputs={k: a.uri for k, a in inputs.items()},
                   summary=summary)
    reporter.log(f"{name}: committed {art.uri}")
    return StageResult(name, art.uri, ps.fingerprint, False, summary)


def num_shards(cfg: PipelineConfig, name: str) -> int:
    stage = REGISTRY[name]
    if stage.num_shards is None:
        raise PlanError(f"stage {name!r} is not sharded")
    return stage.num_shards(cfg)


def preflight(cfg: PipelineConfig, stages: list[str]) -> None:
    """Cheap checks of what the stages about to run will use, so a run does not fail hours in (after MLCD, say)."""
    from .rewards import RewardError

    fc = cfg.finetune
    if "finetune" in stages and any(p.reward_weight for p in fc.phase_configs()):  # the section, or any phase
        if fc.reward_scorer == "mps" and not fc.allow_pickle:
            raise RewardError("finetune.reward_scorer=mps loads a pickled model; set finetune.allow_pickle=true if "
                              "you trust the file, or use reward_scorer=open_clip (checked before any stage runs)")
        if fc.reward_scorer in ("mps", "open_clip") and not fc.reward_model:
            raise RewardError(f"finetune.reward_model is needed for reward_scorer={fc.reward_scorer}")
        if fc.reward_scorer == "mps" and "://" not in fc.reward_model:
            import os

            if not os.path.isfile(fc.reward_model):
                raise RewardError(f"finetune.reward_model={fc.reward_model!r}: no such file")
    _preflight_latent_lpips(cfg, stages)
    if {"mlcd", "lcd-trajectories", "lcd", "finetune", "evaluate"} & set(stages):
        from .lora import check_lora_targets

        check_lora_targets(cfg.teacher, cfg.lora)  # an explicit target list that matches nothing: one LoRAError
    from .evaluation import uses_captions

    captions = cfg.evaluate.metrics.captions
    if {"teacher-evaluate", "evaluate"} & set(stages) and uses_captions(cfg):
        import fsspec

        fs, path = fsspec.core.url_to_fs(captions)
        if not fs.exists(path):
            raise PlanError(f"evaluate.metrics.captions={captions!r}: no such file (COCO-2017 val captions or a text "
                            "file with one caption a line)")


def run_pipeline(cfg: PipelineConfig, stages: list[str] | None = None, force: list[str] | None = None,
                 reporter: Reporter | None = None) -> list[StageResult]:
    """Run the given stages (default: the config's) in order, in this process."""
    run = plan_run(cfg, stages, force)
    store = open_store(cfg)
    return [run_stage(cfg, s, store, reporter, force=s in run.forced, p=run.plan) for s in run.todo]


def _preflight_latent_lpips(cfg: PipelineConfig, stages: list[str]) -> None:
    """A trainer about to run with `distance: latent-lpips` from a weights file: the file is there and fits
    LatentLPIPS (loaded once on the CPU: seconds, where a bad file would otherwise fail the stage after its data)."""
    users = [s for s in ("mlcd", "lcd") if s in stages and getattr(cfg, s).distance == "latent-lpips"]
    if not users or cfg.latent_lpips.source != "file":
        return
    field = f"{users[0]}.distance=latent-lpips with latent_lpips.source=file"
    weights = cfg.latent_lpips.weights  # set: the config refuses source=file without it
    import fsspec

    fs, path = fsspec.core.url_to_fs(weights)
    if not fs.exists(path):
        raise PlanError(f"latent_lpips.weights={weights!r}: no such file ({field} reads it)")
    from .losses import load_latent_lpips

    load_latent_lpips(weights)  # LatentLPIPSWeightsError (a UserError) names the key that does not fit
