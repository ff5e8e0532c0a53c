"""Where the few-step sampler's milestones sit: one trained LoRA of a finished run sampled on other milestone grids.

    python bench/probe_sampler_grid.py --config toy-flow --store S [--stage finetune] [--grids 999,499 999,249 ...]

The student is trained at every segment boundary, so an N-step sampler may visit any N of them; the presets' sampler
takes the official release's index grid (for 2 steps: 999, 499). On a flow teacher the same indices sit at the
teacher's shifted sigmas (SD3's shift 3: sigma 0.75 at index 499), which this probe puts beside other choices. Each
grid is sampled with the run's evaluation protocol (prompts, noise, sample count); the table goes to bench/RESULTS.md.
Nothing is trained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="toy-flow")
    ap.add_argument("--store", required=True)
    ap.add_argument("--stage", default="finetune", help="whose LoRA: mlcd, lcd or finetune")
    ap.add_argument("--grids", nargs="+", default=["999,499", "999,374", "999,249", "999,124"],
                    help="milestone timesteps, descending, comma-separated; all grids the same length")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    import tlcm_core.evaluation as evaluation
    from tlcm_core.config import load_config
    from tlcm_core.lora import read_lora
    from tlcm_core.pipeline import open_store, plan
    from tlcm_core.progress import SilentReporter

    cfg = load_config(args.config, [f"store.url={args.store}", *args.overrides])
    p, store = plan(cfg), open_store(cfg)
    art = store.artifact(args.stage, p.stages[args.stage].fingerprint)
    if not art.exists():
        sys.exit(f"error: {args.stage}/{art.fingerprint} is not in {args.store}: run `tlcm distill --config "
                 f"{args.config} --set store.url={args.store}` first")
    grids = [[int(t) for t in g.split(",")] for g in args.grids]
    n = len(grids[0])
    if any(len(g) != n for g in grids):
        sys.exit("error: every --grids entry must have the same number of timesteps")
    schedule = None
    state = read_lora(art.uri).state
    official = evaluation.sampler_timesteps
    rows = []
    try:
        for grid in grids:
            def fixed(k, bounds, *rest, grid=grid):
                return list(grid) if k == n else official(k, bounds, *rest)

            evaluation.sampler_timesteps = fixed
            row = next(r for r in evaluation.evaluate_rows(cfg, state, [n], SilentReporter())
                       if not r["method"].startswith("teacher"))
            if schedule is None:
                import torch

                from tlcm_core.models import load_schedule

                schedule = load_schedule(cfg.teacher)
            rows.append({"grid": grid, "s_t (a flow's sigma)": [round(float(schedule.coeffs(t, torch.zeros(()))[1]), 3)
                                                                for t in grid],
                         "accuracy": row["prompt_accuracy"], "95% CI": row["accuracy_ci95"],
                         "frechet": row["frechet"], **{k: v for k, v in row.items() if k.startswith("acc_")}})
            print(rows[-1], flush=True)
    finally:
        evaluation.sampler_timesteps = official
    report(f"{args.config}: the {n}-step sampler on other milestone grids ({args.stage} LoRA)", rows,
           notes=f"config {args.config} {' '.join(args.overrides)}; {cfg.evaluate.num_samples} samples per row, "
                 f"evaluate.seed {cfg.evaluate.seed} (the same prompts and noise in every row).")


if __name__ == "__main__":
    main()
