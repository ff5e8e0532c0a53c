"""A teacher for the benchmarks: the shipped toy teacher if present (speed does not depend on its weights)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def teacher_source() -> str:
    from tlcm_core.toy import toy_teacher_path

    if (toy_teacher_path("toy") / "model_index.json").is_file():
        return "toy"
    from tlcm_core.toy.pipeline import build_toy_pipeline

    path = Path(tempfile.mkdtemp(prefix="tlcm-bench-")) / "teacher"
    build_toy_pipeline(seed=0).save_pretrained(path)
    return str(path)
