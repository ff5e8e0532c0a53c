"""Stages as plain functions from (config, input artifacts) to an artifact, and the plan that places them.

Each stage's fingerprint hashes its slice of the resolved config, its input stages' fingerprints and a stage
version (DESIGN.md "Artifacts and caching"). Fingerprints depend on the config alone, so any worker can find
any artifact without running anything: `tlcm/mlcd` on its own locates the cached trajectories.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import STAGES, PipelineConfig
from .lease import artifact_lease
from .progress import Reporter
from .store import ArtifactStore, CorruptArtifactError, IncompleteArtifactError, fingerprint

log = logging.getLogger("tlcm")

LORA_STAGES = ("mlcd", "lcd", "finetune")


class StageInputError(RuntimeError):
    """An input artifact a stage needs is not there (or not complete)."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: int
    inputs: Callable[[PipelineConfig], dict[str, str]]  # input name -> upstream stage
    config: Callable[[PipelineConfig], dict[str, Any]]  # the config slice that determines the output
    run: Callable[..., dict]  # run(cfg, inputs: dict[name, Artifact], out: Artifact, reporter) -> summary


def _teacher(cfg: PipelineConfig) -> dict:
    from .models import teacher_identity

    return teacher_identity(cfg.teacher)


def _traj_config(cfg: PipelineConfig) -> dict:
    from .prompts import load_prompts, prompts_digest

    t = cfg.trajectories.model_dump(mode="json")
    t["prompts_digest"] = prompts_digest(load_prompts(cfg.trajectories.prompts))
    del t["batch_size"]  # batching does not change the samples
    return {"teacher": _teacher(cfg), "schedule": cfg.schedule.model_dump(mode="json"), "trajectories": t,
            "seed": cfg.compute.seed, "dtype": cfg.compute.dtype}


def _trainer_config(section: str) -> Callable[[PipelineConfig], dict]:
    def f(cfg: PipelineConfig) -> dict:
        tcfg = getattr(cfg, section).model_dump(mode="json")
        for k in ("log_every", "prefetch"):  # bookkeeping that does not change the weights
            tcfg.pop(k, None)
        out = {section: tcfg, "lora": cfg.lora.model_dump(mode="json"), "seed": cfg.compute.seed,
               "dtype": cfg.compute.dtype, "schedule": cfg.schedule.model_dump(mode="json"),
               "num_processes": cfg.compute.num_processes}
        if tcfg.get("distance") == "latent-lpips" and cfg.latent_lpips.source == "file":
            out["latent_lpips_weights"] = cfg.latent_lpips.weights  # other sources: the input artifact's fingerprint
        return out

    return f


def final_lora_stage(cfg: PipelineConfig, before: str = "evaluate") -> str | None:
    """The last LoRA-producing stage of the configured pipeline before `before` (None: evaluate the teacher)."""
    upto = cfg.stages[: cfg.stages.index(before)] if before in cfg.stages else cfg.stages
    lora = [s for s in upto if s in LORA_STAGES and s in SPECS]
    return lora[-1] if lora else None


def _run_trajectories(cfg, inputs, out, reporter):
    from .trajectories import run_teacher_trajectories

    return run_teacher_trajectories(cfg, out, reporter)


def _run_mlcd(cfg, inputs, out, reporter):
    from .mlcd import run_mlcd

    return run_mlcd(cfg, inputs["pairs"], out, reporter, lpips_art=inputs.get("lpips"))


def _lpips_inputs(cfg: PipelineConfig) -> dict[str, str]:
    return {"pairs": "teacher-trajectories"} if cfg.latent_lpips.source == "datafree" else {}


def _lpips_config(cfg: PipelineConfig) -> dict:
    # the teacher identifies the VAE that encodes (BAPPS) or decodes (data-free) the latents
    return {"latent_lpips": cfg.latent_lpips.model_dump(mode="json"), "teacher": _teacher(cfg)}


def _run_latent_lpips(cfg, inputs, out, reporter):
    from .lpips_stage import run_latent_lpips

    return run_latent_lpips(cfg, inputs, out, reporter)


def _with_latent_lpips(section: str, inputs: dict[str, str]) -> Callable[[PipelineConfig], dict[str, str]]:
    """A trainer whose distance is latent-lpips also reads the latent-lpips artifact (unless the weights are a file)."""

    def f(cfg: PipelineConfig) -> dict[str, str]:
        if getattr(cfg, section).distance == "latent-lpips" and cfg.latent_lpips.source != "file":
            return {**inputs, "lpips": "latent-lpips"}
        return dict(inputs)

    return f


def _lcd_traj_config(cfg: PipelineConfig) -> dict:
    from .prompts import load_prompts, prompts_digest

    lc = cfg.lcd_trajectories.model_dump(mode="json")
    del lc["batch_size"]
    return {"teacher": _teacher(cfg), "schedule": cfg.schedule.model_dump(mode="json"), "lcd_trajectories": lc,
            "prompts_digest": prompts_digest(load_prompts(cfg.trajectories.prompts)), "seed": cfg.compute.seed,
            "dtype": cfg.compute.dtype, "storage_dtype": cfg.trajectories.storage_dtype}


def _run_lcd_trajectories(cfg, inputs, out, reporter, shards=None):
    from .lcd import run_lcd_trajectories

    return run_lcd_trajectories(cfg, inputs["lora"], out, reporter, shards=shards)


def _run_lcd(cfg, inputs, out, reporter):
    from .lcd import run_lcd

    return run_lcd(cfg, inputs["pairs"], inputs["init"], out, reporter, lpips_art=inputs.get("lpips"))


def _run_finetune(cfg, inputs, out, reporter):
    from .finetune import run_finetune

    return run_finetune(cfg, inputs["init"], out, reporter)


def _finetune_inputs(cfg: PipelineConfig) -> dict[str, str]:
    stage = final_lora_stage(cfg, before="finetune")
    if stage is None:
        raise ValueError("finetune needs a LoRA stage before it (mlcd or lcd) in the pipeline's stages")
    return {"init": stage}


def _finetune_config(cfg: PipelineConfig) -> dict:
    out = _trainer_config("finetune")(cfg)
    out["teacher"] = _teacher(cfg)
    out["guidance"] = cfg.schedule.guidance
    return out


def _run_export(cfg, inputs, out, reporter):
    from .export import run_export

    return run_export(cfg, inputs["lora"], out, reporter, metrics_art=inputs.get("metrics"))


def _export_inputs(cfg: PipelineConfig) -> dict[str, str]:
    stage = final_lora_stage(cfg, before="export")
    if stage is None:
        raise ValueError("stage 'export' needs a LoRA stage (mlcd, lcd or finetune) before it in stages")
    return {"lora": stage, **({"metrics": "evaluate"} if "evaluate" in cfg.stages else {})}


def _run_evaluate(cfg, inputs, out, reporter):
    from .evaluate import run_evaluate

    return run_evaluate(cfg, inputs.get("lora"), out, reporter)


def _eval_inputs(cfg: PipelineConfig) -> dict[str, str]:
    stage = final_lora_stage(cfg)
    return {"lora": stage} if stage else {}


SPECS: dict[str, StageSpec] = {
    "teacher-trajectories": StageSpec("teacher-trajectories", 1, lambda c: {}, _traj_config, _run_trajectories),
    "latent-lpips": StageSpec("latent-lpips", 1, _lpips_inputs, _lpips_config, _run_latent_lpips),
    "mlcd": StageSpec("mlcd", 1, _with_latent_lpips("mlcd", {"pairs": "teacher-trajectories"}), _trainer_config("mlcd"),
                      _run_mlcd),
    "lcd-trajectories": StageSpec("lcd-trajectories", 1, lambda c: {"lora": "mlcd"}, _lcd_traj_config,
                                  _run_lcd_trajectories),
    "lcd": StageSpec("lcd", 1, _with_latent_lpips("lcd", {"pairs": "lcd-trajectories", "init": "mlcd"}),
                     _trainer_config("lcd"), _run_lcd),
    "finetune": StageSpec("finetune", 1, _finetune_inputs, _finetune_config, _run_finetune),
    "evaluate": StageSpec(
        "evaluate", 1, _eval_inputs,
        lambda c: {"teacher": _teacher(c), "evaluate": c.evaluate.model_dump(mode="json"),
                   "schedule": c.schedule.model_dump(mode="json"), "lora": c.lora.model_dump(mode="json"),
                   "seed": c.compute.seed, "dtype": c.compute.dtype},
        _run_evaluate),
    "export": StageSpec(
        "export", 1, _export_inputs,
        lambda c: {"teacher": _teacher(c), "export": c.export.model_dump(mode="json"),
                   "schedule": c.schedule.model_dump(mode="json"), "lora": c.lora.model_dump(mode="json")},
        _run_export),
}


def _run_trajectory_shards(cfg, inputs, out, reporter, shards):
    from .trajectories import run_teacher_trajectories

    return run_teacher_trajectories(cfg, out, reporter, shards=shards)


# Stages whose work splits into shards that several workers can fill at once.
SHARDED: dict[str, Callable[..., dict]] = {"teacher-trajectories": _run_trajectory_shards,
                                           "lcd-trajectories": _run_lcd_trajectories}


def num_shards(cfg: PipelineConfig, name: str) -> int:
    if name in ("teacher-trajectories", "lcd-trajectories"):
        t = cfg.trajectories if name == "teacher-trajectories" else cfg.lcd_trajectories
        return -(-t.num_samples // t.shard_size)
    raise ValueError(f"stage {name!r} is not sharded")


def implemented_stages() -> list[str]:
    return [s for s in STAGES if s in SPECS]


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
    p = Plan()
    missing = [s for s in cfg.stages if s not in SPECS]
    if missing:
        raise ValueError(f"stage(s) {missing} are not implemented yet; implemented: {', '.join(implemented_stages())}")

    def visit(name: str) -> PlannedStage:
        if name in p.stages:
            return p.stages[name]
        spec = SPECS[name]
        inputs = spec.inputs(cfg)
        fps = {k: visit(up).fingerprint for k, up in inputs.items()}
        conf = spec.config(cfg)
        ps = PlannedStage(name, fingerprint(name, spec.version, conf, fps), inputs, conf, spec.version)
        p.stages[name] = ps
        return ps

    for s in cfg.stages:
        visit(s)
    p.stages = {s: p.stages[s] for s in STAGES if s in p.stages}
    return p


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


def run_stage(cfg: PipelineConfig, name: str, store: ArtifactStore | None = None, reporter: Reporter | None = None,
              force: bool = False, p: Plan | None = None, shards: list[int] | None = None) -> StageResult:
    """Run one stage unless its artifact is complete (a cache hit). A corrupt artifact is reported, never used.

    `shards` (sharded stages only) computes just those shards and does not commit: several workers can fill
    one artifact in parallel, and a final call without `shards` fills any gap and commits.
    """
    store = store or open_store(cfg)
    reporter = reporter or Reporter()
    p = p or plan(cfg)
    ps = p[name]
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
        if name not in SHARDED:
            raise ValueError(f"stage {name!r} is not sharded; only {', '.join(SHARDED)} take shards")
        reporter.log(f"{name}: computing shards {shards} of {art.uri}")
        summary = SHARDED[name](cfg, inputs, art, reporter, shards)
        return StageResult(name, art.uri, ps.fingerprint, False, summary)
    # one worker computes; a concurrent run of the same stage and fingerprint waits and reuses its result
    with artifact_lease(art, done=art.exists, log=reporter.log) as mine:
        if not mine:
            m = art.manifest(verify=cfg.store.verify)
            reporter.log(f"{name}: computed meanwhile by another worker: cache hit {art.uri}")
            return StageResult(name, art.uri, ps.fingerprint, True, m.summary)
        reporter.log(f"{name}: computing {art.uri}")
        t0 = time.perf_counter()
        summary = SPECS[name].run(cfg, inputs, art, reporter)
        summary = {**summary, "wall_seconds": round(time.perf_counter() - t0, 2)}  # this run's work (not resumed)
        mine.check()  # another worker took over (our heartbeats stalled): it commits, not us
        art.commit(version=ps.version, config=ps.config, inputs={k: a.uri for k, a in inputs.items()},
                   summary=summary)
    reporter.log(f"{name}: committed {art.uri}")
    return StageResult(name, art.uri, ps.fingerprint, False, summary)


def preflight(cfg: PipelineConfig, stages: list[str]) -> None:
    """Cheap checks of what later stages will need, so a run does not fail hours in (after MLCD, say)."""
    from .rewards import RewardError

    fc = cfg.finetune
    if "finetune" in stages and fc.reward_weight:
        if fc.reward_scorer == "mps" and not fc.allow_pickle:
            raise RewardError("finetune.reward_scorer=mps loads a pickled model; set finetune.allow_pickle=true if "
                              "you trust the file, or use reward_scorer=open_clip (checked before any stage runs)")
        if fc.reward_scorer in ("mps", "open_clip") and not fc.reward_model:
            raise RewardError(f"finetune.reward_model is needed for reward_scorer={fc.reward_scorer}")
        if fc.reward_scorer == "mps" and "://" not in fc.reward_model:
            import os

            if not os.path.isfile(fc.reward_model):
                raise RewardError(f"finetune.reward_model={fc.reward_model!r}: no such file")
    captions = cfg.evaluate.metrics.captions
    if "evaluate" in stages and captions:
        import fsspec

        fs, path = fsspec.core.url_to_fs(captions)
        if not fs.exists(path):
            raise FileNotFoundError(f"evaluate.metrics.captions={captions!r}: no such file (COCO-2017 val captions "
                                    "or a text file with one caption a line)")


def run_pipeline(cfg: PipelineConfig, stages: list[str] | None = None, force: list[str] | None = None,
                 reporter: Reporter | None = None) -> list[StageResult]:
    """Run the given stages (default: the config's) in order, in this process."""
    todo = stages or cfg.stages
    preflight(cfg, todo)
    p = plan(cfg)
    store = open_store(cfg)
    store.check_access(write=True)
    forced: set[str] = set()
    for f in force or []:
        if f not in p.stages:
            raise ValueError(f"--force {f!r}: not a stage of this pipeline ({', '.join(p.stages)})")
        forced.update(p.dependents(f))
    return [run_stage(cfg, s, store, reporter, force=s in forced, p=p) for s in STAGES if s in todo]
