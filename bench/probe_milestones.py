"""Where between two LoRAs does the damage sit? A hybrid TLCM sampler that takes each milestone's x0 prediction from
LoRA A or LoRA B (issue 16's no-training probe: stage 1 vs stage 2).

For each step count it samples with A everywhere, B everywhere, B at exactly one milestone (A elsewhere) and A at
exactly one milestone (B elsewhere), on the same prompts, starting noise and re-noising draws as `evaluate`, and
scores with the toy evaluator (prompt accuracy, per-attribute accuracy, Frechet distance).

    python bench/probe_milestones.py --config toy-hard --a STORE/mlcd/FP --b STORE/lcd/FP [--steps 1,2,4]
        [--samples 1024]
"""

from __future__ import annotations

import argparse


from _toy import probe_setup
from common import report
from tlcm_core.evaluation import Sampler, ToyMetrics
from tlcm_core.lora import read_lora
from tlcm_core.models import load_pipeline
from tlcm_core.schedule import milestones, sampler_timesteps


class Hybrid:
    """A denoiser that answers with B at the timesteps in `b_at` and with A elsewhere."""

    def __init__(self, a, b, b_at: set[int]):
        self.a, self.b, self.b_at = a, b, b_at

    def __call__(self, x, t, cond):
        return (self.b if int(t[0]) in self.b_at else self.a)(x, t, cond)


def score(sampler: Sampler, metrics: ToyMetrics, steps: int, n: int, seed: int, batch: int) -> dict:
    metrics.reset()
    for images, prompts, _ in sampler.batches(steps, n, seed, batch):
        metrics.update(images, prompts)
    return metrics.compute()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="LoRA A (an mlcd/lcd/finetune artifact folder or a file)")
    ap.add_argument("--b", required=True, help="LoRA B")
    ap.add_argument("--steps", default="1,2,4")
    args, cfg, device = probe_setup(ap)
    ev = cfg.evaluate
    samplers = {k: Sampler(cfg, load_pipeline(cfg.teacher, device), read_lora(ref).state)
                for k, ref in (("A", args.a), ("B", args.b))}
    a, b = samplers["A"].denoiser, samplers["B"].denoiser
    metrics = ToyMetrics(cfg.teacher.toy_world, max(args.samples, 256), ev.seed)
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        ts = sampler_timesteps(steps, milestones(1000, cfg.schedule.segments))
        variants = [("A", set()), ("B", set(ts))]
        if steps > 1:
            variants += [(f"B at {t} only", {t}) for t in ts] + [(f"A at {t} only", set(ts) - {t}) for t in ts]
        if steps > 2:  # each LoRA where it is best: A at the upper half of the milestones, B at the lower half
            low = set(ts[len(ts) // 2:])
            variants += [(f"A at {', '.join(str(t) for t in ts if t not in low)}, B below", low)]
        for name, b_at in variants:
            samplers["A"].denoiser = Hybrid(a, b, b_at)
            m = score(samplers["A"], metrics, steps, args.samples, ev.seed, ev.batch_size)
            rows.append({"steps": steps, "x0 from": name, "accuracy": m["prompt_accuracy"],
                         "95% CI": m["accuracy_ci95"], "frechet": m["frechet"],
                         **{k: v for k, v in m.items() if k.startswith("acc_")}})
            print(rows[-1], flush=True)
    report("Hybrid sampler: each milestone's x0 from LoRA A or B", rows,
           notes=f"A = `{args.a}`, B = `{args.b}`; {args.samples} samples per row, evaluate.seed {ev.seed}; the "
                 "same starting noise and re-noising draws in every row.")


if __name__ == "__main__":
    main()
