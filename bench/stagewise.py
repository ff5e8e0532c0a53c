"""What each stage adds, from a finished run: the LoRA of every training stage (mlcd, lcd, finetune) of a config,
evaluated with the same prompts and noise, beside the teacher's rows.

    python bench/stagewise.py --config toy-flow --store ./tlcm-artifacts [--steps 1,2,4] [--samples 1024]

The stages must be in the store (run `tlcm distill --config CONFIG` first, with the same --set overrides); nothing is
trained here. Rows: the teacher's baseline sampler at `evaluate.teacher_steps` (the run's teacher-evaluate artifact,
else sampled here), then each stage's LoRA at --steps. The
table is appended to bench/RESULTS.md (--no-append: printed only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import report  # noqa: E402

TRAINERS = ("mlcd", "lcd", "finetune")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="toy-flow")
    ap.add_argument("--store", required=True)
    ap.add_argument("--steps", default="1,2,4")
    ap.add_argument("--samples", type=int, default=None, help="default: the config's evaluate.num_samples")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--title", default=None)
    ap.add_argument("--no-append", action="store_true", help="print the table only (not into bench/RESULTS.md)")
    args = ap.parse_args()

    from tlcm_core.config import load_config
    from tlcm_core.evaluation import evaluate_rows, load_teacher_rows
    from tlcm_core.lora import read_lora
    from tlcm_core.pipeline import open_store, plan
    from tlcm_core.progress import Reporter

    cfg = load_config(args.config, [f"store.url={args.store}", *args.overrides,
                                    *([f"evaluate.num_samples={args.samples}"] if args.samples else [])])
    store, p = open_store(cfg), plan(cfg)
    reporter = Reporter(bars=sys.stderr.isatty())
    steps = [int(s) for s in args.steps.split(",")]
    rows = []

    def add(label: str, ev: list[dict], teacher: bool) -> None:
        for r in ev:
            if r["method"].startswith("teacher") == teacher:
                rows.append({"LoRA": label, "method": r["method"], "steps": r["steps"],
                             "accuracy": r["prompt_accuracy"], "95% CI": r["accuracy_ci95"], "frechet": r["frechet"],
                             **{k: v for k, v in r.items() if k.startswith("acc_")}})

    te = p.stages.get("teacher-evaluate")
    te_art = store.artifact("teacher-evaluate", te.fingerprint) if te is not None else None
    if te_art is not None and te_art.exists():  # the run's own teacher rows: the same prompts and noise
        add("none (teacher)", load_teacher_rows(te_art).rows, teacher=True)
    else:
        add("none (teacher)", evaluate_rows(cfg, None, list(cfg.evaluate.teacher_steps), reporter), teacher=True)
    for stage in TRAINERS:
        if stage not in p.stages:
            continue
        art = store.artifact(stage, p.stages[stage].fingerprint)
        if not art.exists():
            sys.exit(f"error: {stage}/{p.stages[stage].fingerprint} is not in {args.store}: run `tlcm distill "
                     f"--config {args.config} --set store.url={args.store}` (with the same --set) first")
        add(f"after {stage}", evaluate_rows(cfg, read_lora(art.uri).state, steps, reporter), teacher=False)
    report(args.title or f"{args.config}: what each stage adds", rows,
           notes=f"config {args.config} {' '.join(args.overrides)}; {cfg.evaluate.num_samples} samples per row, "
                 f"evaluate.seed {cfg.evaluate.seed} (the same prompts and noise in every row).",
           append=not args.no_append)


if __name__ == "__main__":
    main()
