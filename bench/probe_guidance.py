"""The teacher's 25-step rows at several CFG scales, and with guidance over part of the trajectory only (issue 16).

The toy world's Frechet distance is taken against real images, and CFG moves the teacher's samples away from them as
w grows: this probe finds the scale at which the teacher is nearest the data and what accuracy it keeps there. An
interval row `LO:HI:W_IN:W_OUT` guides with W_IN at timesteps LO..HI and with W_OUT elsewhere (guidance over a limited
interval, Kynkäänniemi et al. 2024), by giving the teacher's guided forward pass a per-sample scale.

    python bench/probe_guidance.py --config toy-hard --scales 2,3,4,5,7 --intervals 0:600:7:3,400:999:7:3
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

import torch

from _toy import probe_setup
from common import report
from tlcm_core.evaluation import evaluate_rows
from tlcm_core.models import Denoiser
from tlcm_core.progress import SilentReporter


@contextmanager
def guidance_interval(lo: int, hi: int, w_in: float, w_out: float):
    """Every guided teacher call uses w_in for samples at timesteps in [lo, hi] and w_out for the others."""
    guided = Denoiser.guided

    def by_timestep(self, x_t, t, cond, uncond, w):
        steps = self._timesteps(x_t, t)
        inside = (steps >= lo) & (steps <= hi)
        if inside.all() or not inside.any():  # the DDIM teacher's batches share one timestep: one guided pass
            return guided(self, x_t, t, cond, uncond, w_in if inside.all() else w_out)
        a, b = guided(self, x_t, t, cond, uncond, w_in), guided(self, x_t, t, cond, uncond, w_out)
        inside = inside.view(-1, *[1] * (x_t.dim() - 1))
        return torch.where(inside, a[0], b[0]), torch.where(inside, a[1], b[1])

    Denoiser.guided = by_timestep
    try:
        yield
    finally:
        Denoiser.guided = guided


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", default="2,3,4,5,7", help="comma-separated CFG scales")
    ap.add_argument("--intervals", default="", help="comma-separated LO:HI:W_IN:W_OUT")
    ap.add_argument("--steps", type=int, default=25)
    args, cfg, _ = probe_setup(ap)
    cfg.evaluate.num_samples = args.samples
    rows = []

    def row(label: str, w: float) -> dict:
        c = cfg.model_copy(deep=True)
        c.schedule.guidance, c.evaluate.teacher_guidance = w, None
        (r,) = evaluate_rows(c, None, [args.steps], SilentReporter())
        return {"guidance": label, **{k: r[k] for k in r if k not in ("method", "seconds_per_image")}}

    for w in (float(s) for s in args.scales.split(",") if s):
        rows.append(row(f"{w:g}", w))
    for spec in (s for s in args.intervals.split(",") if s):
        lo, hi, w_in, w_out = spec.split(":")
        with guidance_interval(int(lo), int(hi), float(w_in), float(w_out)):
            rows.append(row(f"{w_in} at t in [{lo}, {hi}], {w_out} elsewhere", float(w_in)))
    report(f"The teacher's {args.steps} DDIM steps at other guidance scales", rows,
           notes=f"{args.samples} samples per row, evaluate.seed {cfg.evaluate.seed}; the same prompts and noise in "
                 "every row.")


if __name__ == "__main__":
    main()
