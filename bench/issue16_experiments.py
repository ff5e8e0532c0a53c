"""Issue 16's experiments on toy-hard: why stage 2 (LCD) lowers prompt accuracy and what stops it, and what each
stage-3 term adds. Stage-2 variants train from the same stage-1 LoRA, stage-3 variants from the same stage-2 LoRA
(the one `--set lcd...` configures); every row is evaluated at 1, 2 and 4 steps on the same samples and noise.

    python bench/issue16_experiments.py --store /tmp/th/store [--only base,dose100,...] [--samples 1024]

Variants share one store with `tlcm distill --config toy-hard`, so the stage-1 LoRA, the teacher's pairs and every
variant's stage-2 pairs are computed once. `mlcd-continued` is the control of hypothesis 3: MLCD's own loss on the
teacher's pairs, continued from the stage-1 LoRA with LCD's budget and learning rate (not a pipeline stage: it is
trained here into `<store>/bench-mlcd-continued/<fingerprint>`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import report  # noqa: E402

S2 = ["teacher-trajectories", "mlcd", "lcd-trajectories", "lcd"]
S3 = S2 + ["finetune"]
VARIANTS = {  # key -> (label, overrides [, stages]); stage-2 variants start from the same stage-1 LoRA
    "stage1": ("stage 1 only (MLCD)", None),
    "base": ("+ LCD as the paper (400 it, lr 1e-5, p 3, same eps)", []),
    "dose100": ("+ LCD, 100 iterations", ["lcd.iterations=100"]),
    "dose200": ("+ LCD, 200 iterations", ["lcd.iterations=200"]),
    "dose800": ("+ LCD, 800 iterations", ["lcd.iterations=800"]),
    "control": ("+ MLCD continued (400 it, lr 1e-5)", "control"),
    "jump": ("+ LCD compared after the DDIM jump", ["lcd.compare=jump"]),
    "jump-lr1e-4": ("+ LCD jump, lr 1e-4", ["lcd.compare=jump", "lcd.lr=1e-4"]),
    "fresh": ("+ LCD, fresh re-noising eps", ["lcd_trajectories.renoise=fresh"]),
    "lr3e-6": ("+ LCD, lr 3e-6", ["lcd.lr=3e-6"]),
    "lr3e-5": ("+ LCD, lr 3e-5", ["lcd.lr=3e-5"]),
    "p1": ("+ LCD, p = 1", ["lcd_trajectories.p=1"]),
    "p2": ("+ LCD, p = 2", ["lcd_trajectories.p=2"]),
    "p4": ("+ LCD, p = 4", ["lcd_trajectories.p=4"]),
    "q2": ("+ LCD, q = 2 (clean latents from 2 steps)", ["lcd_trajectories.q=2"]),
    "lpips": ("+ LCD with latent LPIPS", ["lcd.distance=latent-lpips"]),
    "anchor1": ("+ LCD + MLCD anchor (weight 1)", ["lcd.mlcd_weight=1"]),
    "anchor10": ("+ LCD + MLCD anchor (weight 10)", ["lcd.mlcd_weight=10"]),
    "anchor100": ("+ LCD + MLCD anchor (weight 100)", ["lcd.mlcd_weight=100"]),
    "anchor300": ("+ LCD + MLCD anchor (weight 300)", ["lcd.mlcd_weight=300"]),
    "anchor1000": ("+ LCD + MLCD anchor (weight 1000)", ["lcd.mlcd_weight=1000"]),
    "anchor1-jump": ("+ LCD jump + MLCD anchor (weight 1)", ["lcd.compare=jump", "lcd.mlcd_weight=1"]),
    # stage 3 (finetune) from stage 2 as configured (--set lcd... to change it); the preset's weights unless named
    "ft": ("+ finetune (reward 1, DMD 10, GAN 0.05)", [], S3),
    "ft-nogan": ("+ finetune, GAN 0", ["finetune.gan_weight=0"], S3),
    "ft-gan0.5": ("+ finetune, GAN 0.5", ["finetune.gan_weight=0.5"], S3),
    "ft-gan2": ("+ finetune, GAN 2", ["finetune.gan_weight=2"], S3),
    "ft-gan0.5-teacher": ("+ finetune, GAN 0.5, real = teacher samples", ["finetune.gan_weight=0.5",
                                                                          "finetune.gan_real=teacher"], S3),
    "ft-gan2-teacher": ("+ finetune, GAN 2, real = teacher samples", ["finetune.gan_weight=2",
                                                                      "finetune.gan_real=teacher"], S3),
    "ft-gan10-teacher": ("+ finetune, GAN 10, real = teacher samples", ["finetune.gan_weight=10",
                                                                        "finetune.gan_real=teacher"], S3),
    "ft-gan10-teacher-dlr": ("+ finetune, GAN 10, real = teacher samples, discriminator lr 1e-3",
                             ["finetune.gan_weight=10", "finetune.gan_real=teacher",
                              "finetune.discriminator_lr=1e-3"], S3),
    "ft-reward5": ("+ finetune, reward 5", ["finetune.reward_weight=5"], S3),
    "ft-lr3e-5": ("+ finetune, lr 3e-5", ["finetune.lr=3e-5"], S3),
    "ft-lr1e-4": ("+ finetune, lr 1e-4", ["finetune.lr=1e-4"], S3),
    "ft-300": ("+ finetune, 300 iterations", ["finetune.iterations=300"], S3),
    "ft-dmd30": ("+ finetune, DMD 30", ["finetune.dmd_weight=30"], S3),
    "ft-reward0": ("+ finetune, reward 0", ["finetune.reward_weight=0"], S3),
    "ft-fake1e-4": ("+ finetune, fake score lr 1e-4", ["finetune.fake_score_lr=1e-4"], S3),
    "ft-ttur": ("+ finetune, fake score lr 1e-4, 5 fake updates per step (DMD2)",
                ["finetune.fake_score_lr=1e-4", "finetune.fake_updates_per_step=5"], S3),
    "ft-reward-only": ("+ finetune, reward only (DMD 0, GAN 0)", ["finetune.dmd_weight=0", "finetune.gan_weight=0"],
                       S3),
    "ft-dmd-late": ("+ finetune, DMD on t < 500 only", ["finetune.dmd_t_max=500"], S3),
    "ft-q2": ("+ finetune, clean latents from 2 steps", ["finetune.q=2"], S3),
    # the paper's order at toy size: the reward alone (half the steps), then DMD + GAN (the steps at half the batch)
    "ft-phases": ("+ finetune in phases: reward 75 it, then DMD + GAN 150 it at batch 8",
                  ["finetune.phases=[{iterations: 75, dmd_weight: 0, gan_weight: 0}, "
                   "{iterations: 150, batch_size: 8, reward_weight: 0}]"], S3),
}


def train_control(cfg, store, reporter) -> tuple[str, dict]:
    """MLCD's loss on the teacher's pairs from the stage-1 LoRA with the lcd section's settings: (URI, summary)."""
    from tlcm_core.consistency import train_consistency
    from tlcm_core.pipeline import execute, plan, stage_inputs
    from tlcm_core.stage import Stage
    from tlcm_core.stages.common import trainer_reads, trainer_uses
    from tlcm_core.consistency import mlcd_loss

    p = plan(cfg)
    inputs = {"pairs": stage_inputs(cfg, store, "mlcd", p)["pairs"], "init": store.artifact("mlcd", p["mlcd"].fingerprint)}
    fp = hashlib.sha256(json.dumps([p["mlcd"].fingerprint, p["lcd"].config], sort_keys=True, default=str)
                        .encode()).hexdigest()[:16]
    art = store.artifact("bench-mlcd-continued", fp)
    if not art.exists():
        stage = Stage("bench-mlcd-continued", 1, lambda ctx: train_consistency(ctx, ctx.cfg.lcd, mlcd_loss, "init"),
                      reads=trainer_reads("lcd"), uses=trainer_uses("lcd"), trains=True, makes_lora=True)
        summary = execute(stage, cfg, inputs, art, reporter)
        art.commit(version=1, config=p["lcd"].config, inputs={k: a.uri for k, a in inputs.items()}, summary=summary)
    return art.uri, art.manifest().summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="toy-hard")
    ap.add_argument("--store", required=True)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--steps", default="1,2,4")
    ap.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--title", default="Toy-hard: issue 16 experiments")
    args = ap.parse_args()
    from tlcm_core.config import load_config
    from tlcm_core.evaluation import evaluate_rows
    from tlcm_core.lora import read_lora
    from tlcm_core.pipeline import open_store, run_pipeline
    from tlcm_core.progress import Reporter

    reporter = Reporter(bars=sys.stderr.isatty())
    base = [f"store.url={args.store}", f"evaluate.num_samples={args.samples}", f"evaluate.steps=[{args.steps}]",
            "evaluate.teacher_steps=[]", *args.overrides]
    steps = [int(s) for s in args.steps.split(",")]
    rows, times = [], {}
    for key in args.only.split(","):
        label, extra, *named = VARIANTS[key]
        t0 = time.perf_counter()
        if extra == "control":
            cfg = load_config(args.config, [*base, f"stages=[{','.join(S2)}]"])
            run_pipeline(cfg, stages=S2[:2], reporter=reporter)
            uri, summary = train_control(cfg, open_store(cfg), reporter)
            ev = evaluate_rows(cfg, read_lora(uri).state, steps, reporter)
        else:
            stages = named[0] if named else S2[:2] if extra is None else S2
            cfg = load_config(args.config, [*base, f"stages=[{','.join(stages + ['evaluate'])}]", *(extra or [])])
            results = run_pipeline(cfg, reporter=reporter)
            ev = results[-1].summary["rows"]
            summary = results[-2].summary
        times[key] = round(time.perf_counter() - t0)
        for n in steps:
            row = next(r for r in ev if not r["method"].startswith("teacher") and r["steps"] == n)
            rows.append({"variant": label, "steps": n, "accuracy": row["prompt_accuracy"],
                         "95% CI": row["accuracy_ci95"], "frechet": row["frechet"],
                         **{k: v for k, v in row.items() if k.startswith("acc_")},
                         "final loss": (summary or {}).get("final_loss")})
        print(json.dumps(rows[-len(steps):]), flush=True)
    report(args.title, rows, notes=f"config {args.config} {' '.join(args.overrides)}; {args.samples} samples per "
                                   "row, evaluate.seed 1234 (the same noise in every row); wall seconds per variant "
                                   f"(computed or cached stages): {json.dumps(times)}.")


if __name__ == "__main__":
    main()
