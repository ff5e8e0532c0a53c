"""The run report: one Markdown document per finished run, built from the store alone.

It holds what a person asks of a run: the headline table (the teacher's DDIM + CFG against the student at 1-8
steps, from the evaluate artifact's metrics.json), the metrics against steps, a side-by-side grid of the teacher
and the student on the same prompts and starting noise, the training loss curves, and each stage's compute time,
cache status and artifact URI. Images are separate PNG files referenced by relative names, so the folder reads
as-is; `inline_markdown` embeds them as data URIs for a UI that shows one Markdown document (the Prefect flow's
`tlcm-report` artifact, flows/tlcm.py).

Fingerprints depend on the config alone (tlcm_core/pipeline.py), so `build_report(cfg)` finds a run's artifacts
without knowing which process made them: `tlcm report --config NAME --store URL` rebuilds the report of any
finished run; `tlcm report --store URL` alone reports the store's newest evaluated run, found through the inputs
each manifest records. Saved reports live beside the artifacts, in `{store}/report/<evaluate fingerprint>/`.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .config import STAGES, PipelineConfig
from .consistency import LOSS_PLOT
from .errors import UserError
from .evaluation import markdown_table
from .pipeline import Plan, open_store, plan
from .plots import is_teacher, loss_curves_png, metrics_vs_steps_png
from .stages.evaluate import METRICS_PLOT, SIDE_BY_SIDE
from .store import Artifact, ArtifactStore, IncompleteArtifactError, Manifest

REPORT_DIR = "report"  # {store}/report/<evaluate fingerprint>/report.md, beside the stage folders
REPORT_FILE = "report.md"


class NoFinishedRun(UserError):
    """The store holds no finished run of the config (a stage's artifact is missing)."""


@dataclass
class StageRecord:
    """One stage of the run, as its manifest tells it."""

    stage: str
    artifact: Artifact
    manifest: Manifest
    status: str  # "computed" or "cache hit" in a flow run; "complete" when read from the store alone

    @property
    def wall_seconds(self) -> float | None:
        return self.manifest.summary.get("wall_seconds")


@dataclass
class RunReport:
    """The Markdown (images by relative file name) and the images it names."""

    name: str
    key: str  # the evaluate artifact's fingerprint: one report per evaluated run
    markdown: str
    images: dict[str, bytes] = field(default_factory=dict)

    def inline_markdown(self) -> str:
        """The Markdown with every image embedded as a data URI (one self-contained document)."""
        md = self.markdown
        for name, png in self.images.items():
            md = md.replace(f"]({name})", f"](data:image/png;base64,{base64.b64encode(png).decode()})")
        return md

    def save(self, store: ArtifactStore) -> str:
        """Write report.md and its images to {store}/report/<key>/ (overwritten by a later run of the same
        config: cache status and times change, the artifacts do not). Returns the report's URI."""
        folder = store.artifact(REPORT_DIR, self.key)  # a plain folder: never committed, never a cache hit
        for name, png in self.images.items():
            folder.write_bytes(name, png)
        folder.write_bytes(REPORT_FILE, self.markdown.encode())
        return folder.path(REPORT_FILE)

    def write(self, path: str) -> None:
        """Write the Markdown to a local file and the images beside it."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        for name, png in self.images.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(png)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.markdown)


def open_run_store(cfg: PipelineConfig) -> ArtifactStore:
    """The config's store for reading; a local folder that does not exist is refused (not created)."""
    url = cfg.store.url
    if "://" not in url or url.startswith("file://"):
        path = os.path.expanduser(url.split("://", 1)[-1])
        if not os.path.isdir(path):
            raise NoFinishedRun(f"store {url}: no such folder; --store must be where a run of config {cfg.name!r} "
                                "wrote its artifacts")
    return open_store(cfg)


def stage_records(cfg: PipelineConfig, store: ArtifactStore, p: Plan,
                  cached: dict[str, bool] | None = None) -> list[StageRecord]:
    """Every planned stage's complete artifact, in pipeline order; a missing one is a NoFinishedRun."""
    if "evaluate" not in p.stages:
        raise NoFinishedRun(f"config {cfg.name!r} does not evaluate (its stages: {', '.join(cfg.stages)}); a run "
                            "report needs the evaluate stage: add it to the config's `stages`")
    needed = {"evaluate"}  # evaluate and what it was made from; a later stage (export) is listed once it is done
    for name in reversed(p.stages):
        if name in needed:
            needed.update(p[name].inputs.values())
    records = []
    for name, ps in p.stages.items():
        art = store.artifact(name, ps.fingerprint)
        try:
            m = art.manifest(verify="size")
        except IncompleteArtifactError:
            if name not in needed:
                continue
            raise NoFinishedRun(
                f"no finished run of config {cfg.name!r} in {store.url}: stage {name!r} has no complete artifact "
                f"at {art.uri}; run `tlcm distill --config {cfg.name} --store {store.url}` (with the same --set "
                "overrides) first, or check the store (`tlcm artifacts ls --store URL` lists what it holds)") from None
        status = "complete" if cached is None or name not in cached else \
            ("cache hit" if cached[name] else "computed")
        records.append(StageRecord(name, art, m, status))
    return records


def _loss_plot(rec: StageRecord) -> bytes | None:
    """The stage's loss curves: its loss.png, else drawn from its train_log.jsonl (artifacts made before the plot
    was written); None for a stage that does not train."""
    if LOSS_PLOT in rec.manifest.files:
        return rec.artifact.read_bytes(LOSS_PLOT)
    if "train_log.jsonl" not in rec.manifest.files:
        return None
    log = [json.loads(line) for line in rec.artifact.read_bytes("train_log.jsonl").decode().splitlines() if line]
    return loss_curves_png(log, title=f"{rec.stage}: training loss") if log else None


def headline_rows(rows: list[dict]) -> list[dict]:
    """The teacher's rows first (most steps first: the quality reference), then the student's by steps."""
    return sorted(rows, key=lambda r: (not is_teacher(r.get("method")),
                                       -r["steps"] if is_teacher(r.get("method")) else r["steps"]))


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _link(uri: str) -> str:
    href = uri if "://" in uri else f"file://{uri}"
    return f"[{uri}]({href})"  # plain text: Prefect's Markdown shows backticks inside a link literally


def stages_table(records: list[StageRecord]) -> str:
    lines = ["| stage | status | compute time | finished (UTC) | artifact |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r.stage} | {r.status} | {_seconds(r.wall_seconds)} | "
                     f"{r.manifest.created:%Y-%m-%d %H:%M} | {_link(r.artifact.uri)} |")
    total = sum(r.wall_seconds or 0.0 for r in records)
    lines.append(f"\nTotal compute time {_seconds(total)}. A cache hit's time is that of the run that computed it.")
    return "\n".join(lines)


def _comparison_section(ev: StageRecord, images: dict[str, bytes]) -> list[str]:
    out = ["## Same prompts, same starting noise", ""]
    if SIDE_BY_SIDE in ev.manifest.files:
        images["side-by-side.png"] = ev.artifact.read_bytes(SIDE_BY_SIDE)
        out += ["Each column is one prompt from one starting noise: the teacher (DDIM + CFG) at its most steps "
                "above the student at 2 and 4 steps.", "", "![teacher vs student, same prompts and seeds]"
                "(side-by-side.png)"]
    else:
        out += ["No side-by-side grid in this evaluate artifact (evaluate.grid_size is 0, or the run evaluated "
                "the teacher only)."]
    return out + [""]


def build_report(cfg: PipelineConfig, store: ArtifactStore | None = None,
                 results: list[dict] | None = None) -> RunReport:
    """The report of the config's finished run in `store` (default: the config's). `results` (a flow's stage
    results: {stage, cached, ...}) adds whether each stage was computed or a cache hit in that run."""
    store = store or open_run_store(cfg)
    p = plan(cfg)
    cached = {r["stage"]: bool(r["cached"]) for r in results} if results is not None else None
    return render_report(cfg.name, store, stage_records(cfg, store, p, cached))


def build_report_from_store(url: str, evaluate: str | None = None) -> RunReport:
    """The report of a finished run found in the store alone, without its config: the newest complete evaluate
    artifact (or the one whose fingerprint starts with `evaluate`) and, through each manifest's recorded inputs,
    every artifact it was made from."""
    store = _existing_store(url)
    found = [m for m in store.list() if m.stage == "evaluate" and m.fingerprint.startswith(evaluate or "")]
    if not found:
        what = f"evaluate artifact {evaluate}*" if evaluate else "finished (evaluated) run"
        raise NoFinishedRun(f"store {url} holds no {what}; `tlcm artifacts ls --store {url}` lists what it holds")
    ev = max(found, key=lambda m: m.created)
    records: dict[str, StageRecord] = {}

    def visit(art: Artifact) -> None:
        m = art.manifest(verify="size")
        for uri in m.inputs.values():
            up = store.open_uri(uri)
            if up.uri not in records:
                visit(up)
        records[art.uri] = StageRecord(m.stage, art, m, "complete")

    visit(store.artifact("evaluate", ev.fingerprint))
    order = {s: i for i, s in enumerate(STAGES)}
    return render_report(f"run {ev.fingerprint}", store, sorted(records.values(), key=lambda r: order[r.stage]))


def _existing_store(url: str) -> ArtifactStore:
    if ("://" not in url or url.startswith("file://")) and not os.path.isdir(os.path.expanduser(url.split("://")[-1])):
        raise NoFinishedRun(f"store {url}: no such folder; give the --store a run wrote its artifacts to")
    return ArtifactStore(url)


def render_report(name: str, store: ArtifactStore, records: list[StageRecord]) -> RunReport:
    """The Markdown and images of a run, from its stages' complete artifacts (evaluate among them)."""
    ev = next(r for r in records if r.stage == "evaluate")
    rows = ev.artifact.read_json("metrics.json")
    images = {"metrics.png": ev.artifact.read_bytes(METRICS_PLOT) if METRICS_PLOT in ev.manifest.files
              else metrics_vs_steps_png(rows)}
    md = [f"# TLCM run report: {name}", "",
          f"Store `{store.url}`, evaluate artifact {_link(ev.artifact.uri)}; report made "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
          "## Teacher vs student", "", markdown_table(headline_rows(rows)), "",
          f"{rows[0]['samples'] if rows else 0} samples per row, the same prompts and starting noise in every row.",
          "", "![metrics against sampling steps](metrics.png)", ""]
    md += _comparison_section(ev, images)
    losses = [(r.stage, _loss_plot(r)) for r in records]
    if any(png for _, png in losses):
        md += ["## Training", ""]
        for stage, png in losses:
            if png:
                images[f"loss-{stage}.png"] = png
                md += [f"![{stage} training loss](loss-{stage}.png)", ""]
    md += ["## Stages", "", stages_table(records), ""]
    return RunReport(name, ev.manifest.fingerprint, "\n".join(md), images)
