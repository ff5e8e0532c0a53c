"""The toy world's ablation in the shape of TLCM's Table 2: stage 1 only; + latent LPIPS; + stage 2; + reward;
+ DMD; + GAN -- prompt accuracy and Frechet distance at 2 and 4 steps over >= 1024 samples, plus the teacher's
DDIM baseline and each stage's wall time. Variants share one store, so common prefixes are computed once.

    python bench/toy_ablation.py [--config toy] [--samples 1024] [--only stage1,stage2] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import report  # noqa: E402

S1 = ["teacher-trajectories", "mlcd"]
S2 = S1 + ["lcd-trajectories", "lcd"]
VARIANTS = {  # name -> (stages before evaluate, overrides)
    "stage 1 only (MLCD, MSE)": (S1, []),
    "+ latent LPIPS": (["latent-lpips"] + S1, ["mlcd.distance=latent-lpips"]),
    "+ stage 2 (LCD)": (S2, []),
    # stage 3's terms are added one by one with the config's weights (configs/toy.yaml's finetune section)
    "+ reward": (S2 + ["finetune"], ["finetune.dmd_weight=0", "finetune.gan_weight=0"]),
    "+ DMD": (S2 + ["finetune"], ["finetune.gan_weight=0"]),
    "+ GAN": (S2 + ["finetune"], []),
}
KEYS = {"stage1": "stage 1 only (MLCD, MSE)", "lpips": "+ latent LPIPS", "stage2": "+ stage 2 (LCD)",
        "reward": "+ reward", "dmd": "+ DMD", "gan": "+ GAN"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="toy")
    ap.add_argument("--store", default="./runs/ablation")
    ap.add_argument("--samples", type=int, default=1024, help="per row; >= 1024 for a Frechet distance that separates variants")
    ap.add_argument("--steps", default="2,4")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(KEYS)}")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--title", default="Toy-world ablation (TLCM Table 2 shape)")
    args = ap.parse_args()
    from tlcm_core.config import load_config
    from tlcm_core.pipeline import run_pipeline
    from tlcm_core.stages import REGISTRY as SPECS
    from tlcm_core.progress import Reporter

    steps = [int(s) for s in args.steps.split(",")]
    names = [KEYS[k] for k in args.only.split(",")] if args.only else list(VARIANTS)
    rows, times = [], {}  # times: (variant, stage) -> seconds of stages computed in this run
    teacher_done = False
    for name in names:
        stages, extra = VARIANTS[name]
        missing = [s for s in stages if s not in SPECS]
        if missing:
            print(f"skipping {name!r}: stage(s) {missing} not available")
            continue
        ev_teacher = [] if teacher_done else [2, 4, 25]
        cfg = load_config(args.config, [f"store.url={args.store}", f"stages=[{','.join(stages + ['evaluate'])}]",
                                        f"evaluate.num_samples={args.samples}", f"evaluate.steps=[{args.steps}]",
                                        f"evaluate.teacher_steps=[{','.join(map(str, ev_teacher))}]",
                                        *args.overrides, *extra])
        t0 = time.perf_counter()
        results = run_pipeline(cfg, reporter=Reporter(bars=sys.stderr.isatty()))
        for r in results:
            if not r.cached and r.stage != "evaluate":
                times[f"{r.stage} ({name})"] = r.summary.get("wall_seconds", round(time.perf_counter() - t0, 1))
        ev = results[-1].summary["rows"]
        for row in ev:
            if row["method"].startswith("teacher"):
                rows.append({"variant": "teacher DDIM+CFG", **_pick(row)})
                teacher_done = True
        for n in steps:
            row = next(r for r in ev if not r["method"].startswith("teacher") and r["steps"] == n)
            rows.append({"variant": name, **_pick(row)})
    stage_times = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    report(args.title, rows, notes=f"config {args.config} {' '.join(args.overrides)}; {args.samples} samples per row; "
                                   f"wall time of each stage computed in this run: {stage_times}.")


def _pick(row: dict) -> dict:
    return {"steps": row["steps"], "prompt_accuracy": row.get("prompt_accuracy"),
            "acc 95% CI": row.get("accuracy_ci95"), "frechet": row.get("frechet"),
            "s/image": row.get("seconds_per_image")}


if __name__ == "__main__":
    main()
