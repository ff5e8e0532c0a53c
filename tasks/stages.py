"""One Prefect task per stage run. Tensors never travel as results: a task returns the artifact URI and a
small summary. A complete artifact is a cache hit and finishes in a `Cached` state."""

from __future__ import annotations

import base64
import re
import time

from prefect import get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.states import Completed

from tlcm_core.config import PipelineConfig, validate_config
from tlcm_core.evaluation import round_sig
from tlcm_core.pipeline import run_stage
from tlcm_core.progress import Reporter


def _key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


class PrefectReporter(Reporter):
    """Progress, tables and images as Prefect artifacts (and tqdm bars where a terminal watches)."""

    def __init__(self, bars: bool = True, min_interval_s: float = 2.0):
        super().__init__(bars=bars)
        self._progress_ids: dict[str, object] = {}
        self._last: dict[str, float] = {}
        self.min_interval_s = min_interval_s

    def progress(self, key: str, done: int, total: int, **metrics: float) -> None:
        super().progress(key, done, total, **metrics)
        pct = 100.0 * done / max(total, 1)
        desc = f"{key}: {done}/{total}" + "".join(f", {k}={v:.4g}" for k, v in metrics.items())
        now = time.monotonic()
        try:
            if key not in self._progress_ids:
                self._progress_ids[key] = create_progress_artifact(pct, key=_key(f"progress-{key}"), description=desc)
            elif done >= total or now - self._last.get(key, 0) >= self.min_interval_s:
                update_progress_artifact(self._progress_ids[key], pct, description=desc)
            else:
                return
            self._last[key] = now
        except Exception as e:  # the UI is a convenience: never fail work because of it
            get_run_logger().debug(f"progress artifact failed: {e}")

    def log(self, message: str) -> None:
        get_run_logger().info(message)

    def table(self, key: str, rows: list[dict], description: str = "") -> None:
        rows = [round_sig(r) for r in rows]  # 4 significant digits: a table is read, metrics.json keeps the rest
        flat = [{k: (str(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in rows]
        create_table_artifact(flat, key=_key(key), description=description)

    def image(self, key: str, png: bytes, description: str = "") -> None:
        data = base64.b64encode(png).decode()
        create_markdown_artifact(f"### {description or key}\n\n![{key}](data:image/png;base64,{data})",
                                 key=_key(key), description=description)


# persist_result=False (hence no Prefect cache): results are small dicts rebuilt from the store, and Prefect's
# default result serializer is pickle -- a cached or retried task would unpickle whatever its result storage holds.
@task(name="stage", task_run_name="{stage}", log_prints=True, persist_result=False)
def stage_task(stage: str, config: dict, force: bool = False, bars: bool = False, shards: list[int] | None = None):
    """Run (or find cached) one stage; returns {stage, uri, fingerprint, cached, summary}.
    With `shards`, compute only those shards of a sharded stage (no commit)."""
    cfg: PipelineConfig = validate_config(config, source="flow parameter")
    reporter = PrefectReporter(bars=bars)
    result = run_stage(cfg, stage, reporter=reporter, force=force, shards=shards)
    out = result.as_dict()
    what = ("cache hit" if result.cached else "computed") if shards is None else \
        f"shards {shards} written; committed by the run without shards"
    create_link_artifact(result.uri if "://" in result.uri else f"file://{result.uri}", link_text=result.uri,
                         key=_key(f"artifact-{stage}"), description=f"{stage} artifact ({what})")
    if result.cached:
        return Completed(data=out, name="Cached", message=f"cache hit: {result.uri}")
    return out
