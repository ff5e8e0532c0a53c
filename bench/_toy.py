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


def probe_setup(ap):
    """A toy probe's common arguments (--config, --samples, --set K=V) parsed; returns (args, config, device)."""
    from tlcm_core.config import load_config
    from tlcm_core.models import resolve_device, setup_threads

    ap.add_argument("--config", default="toy-hard")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    setup_threads(cfg.compute)
    return args, cfg, resolve_device(cfg.compute)
