"""The `toy-teacher` deployment's flow: (re)train the toy world's teacher and publish it to any fsspec URL.

`out` is a local folder (training resumes there from its checkpoints) or a remote URL such as
`s3://bucket/teachers/toy`: then training runs in a local work folder and the finished diffusers folder is
uploaded to `{out}/pipeline`, ready for `--set teacher.source={out}/pipeline`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact

from tasks.stages import PrefectReporter


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def upload_folder(local_dir: str | os.PathLike, url: str) -> list[str]:
    """Copy every file under `local_dir` to `url` (same relative paths); returns the relative paths.
    S3 credentials and endpoint come from the standard AWS_* variables (tlcm_core.store)."""
    import fsspec

    from tlcm_core.store import storage_options_from_env

    protocol = url.split("://", 1)[0]
    opts = storage_options_from_env() if protocol in ("s3", "s3a") else {}
    fs, root = fsspec.core.url_to_fs(url, **opts)
    root = root.rstrip("/")
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"nothing to upload under {local_dir}")
    files.sort(key=lambda p: p.name == "model_index.json")  # last: whoever sees it sees the whole folder
    for p in files:
        fs.put_file(str(p), f"{root}/{p.relative_to(local_dir).as_posix()}")
    return [p.relative_to(local_dir).as_posix() for p in files]


def train_and_publish(settings: dict[str, Any], out: str, work_dir: str | None = None, progress=None,
                      kind: str = "unet") -> str:
    """Train (resuming) into `out` if it is local, else into `work_dir` (default: a temp folder) and upload
    the `pipeline` folder to `{out}/pipeline`. Returns the pipeline's location. `kind`: "unet" (the SDXL-shaped
    teacher) or "flow" (the SD3-shaped flow teacher, on the VAE of the world's shipped UNet teacher)."""
    if kind not in ("unet", "flow"):
        raise ValueError(f"kind={kind!r}: a toy teacher is 'unet' or 'flow'")
    if kind == "flow":
        from tlcm_core.toy.flow_teacher import ToyFlowTeacherSettings, train_toy_flow_teacher

        s, train = ToyFlowTeacherSettings(**settings), train_toy_flow_teacher
    else:
        from tlcm_core.toy.teacher import ToyTeacherSettings, train_toy_teacher

        s, train = ToyTeacherSettings.for_world(**settings), train_toy_teacher  # the world's recipe, then settings
    if not _is_remote(out):
        local = out[len("file://"):] if out.startswith("file://") else out
        return str(train(s, local, progress=progress, resume=True))
    with tempfile.TemporaryDirectory(prefix="tlcm-toy-teacher-") as tmp:
        pipeline = train(s, work_dir or tmp, progress=progress, resume=True)
        dest = out.rstrip("/") + "/pipeline"
        upload_folder(pipeline, dest)
        return dest


@flow(name="tlcm", flow_run_name="toy-teacher", log_prints=True)
def toy_teacher(out: str, world: str = "toy", settings: dict[str, Any] | None = None,
                work_dir: str | None = None, kind: str = "unet") -> str:
    """Train the toy teacher (tlcm_core.toy.teacher) and publish it at `out`; returns the pipeline URL.

    out: a local folder or an fsspec URL (s3://bucket/prefix); the diffusers folder lands in `{out}/pipeline`.
    world: the toy world to learn.
    settings: ToyTeacherSettings fields to change, e.g. {"unet_steps": 3000} (ToyFlowTeacherSettings' with kind
        "flow").
    work_dir: local folder for checkpoints when `out` is remote (default: a temp folder); a persistent one
        lets a restarted run resume.
    kind: "unet" (the SDXL-shaped teacher) or "flow" (the SD3-shaped flow-matching one).
    """
    logger = get_run_logger()
    reporter = PrefectReporter(bars=False)

    def progress(phase: str, step: int, total: int, metrics: dict) -> None:
        reporter.progress(f"toy-teacher {phase}", step, total,
                          **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    url = train_and_publish({"world": world, **(settings or {})}, out, work_dir=work_dir, progress=progress,
                            kind=kind)
    logger.info(f"toy teacher published at {url}; use it with --set teacher.source={url}")
    create_link_artifact(url if "://" in url else f"file://{url}", link_text=url, key="artifact-toy-teacher",
                         description="the trained toy teacher (a diffusers folder)")
    return url
