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


def mlcd_overrides(work_dir: str, samples: int, iterations: int) -> list[str]:
    """toy-hard's MLCD as a CPU bench runs it: the pairs in `work_dir` (sampled on a first run, then reused),
    `iterations` steps, no checkpoints, one loss log at the end."""
    return ["compute.device=cpu", f"store.url={work_dir}", f"trajectories.num_samples={samples}",
            f"mlcd.iterations={iterations}", f"mlcd.checkpoint_every={iterations + 1}", f"mlcd.log_every={iterations}"]


def run_mlcd(overrides: list[str], ref: dict | None = None) -> tuple[dict, dict]:
    """MLCD recomputed on toy-hard with `overrides` (its pairs already sampled): a table row with the stage's wall
    time, its steps per second and how far its LoRA is from `ref` (itself when None), and the LoRA."""
    import time

    from tlcm_core.config import load_config
    from tlcm_core.pipeline import open_store, run_pipeline
    from tlcm_core.progress import SilentReporter

    cfg = load_config("toy-hard", overrides)
    t0 = time.perf_counter()
    (res,) = run_pipeline(cfg, stages=["mlcd"], force=["mlcd"], reporter=SilentReporter())
    wall = time.perf_counter() - t0
    lora = open_store(cfg).artifact("mlcd", res.fingerprint).load_tensors("lora.safetensors")
    ref = ref or lora
    return {"stage wall, s": wall, "steps/s": res.summary["steps_per_second"],
            "max |LoRA - ref|": max(float((lora[k] - ref[k]).abs().max()) for k in ref),
            "max |LoRA|": max(float(v.abs().max()) for v in ref.values())}, lora
