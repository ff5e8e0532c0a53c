"""Stage `lcd`: improved data-free latent consistency distillation across milestones (TLCM section 4.2, eq. 10),
on the pairs of `lcd-trajectories`, continuing the stage-1 LoRA; the teacher is not loaded."""

from __future__ import annotations

from functools import partial

import torch

from ..consistency import train_consistency
from ..losses import consistency_loss
from ..models import Denoiser
from ..pairs import Batch
from ..schedule import ddim
from ..stage import Stage, StageContext
from .common import trainer_reads, trainer_uses, with_latent_lpips


def lcd_loss(student: Denoiser, batch: Batch, distance, compare: str = "x0") -> torch.Tensor:
    """TLCM eq. 10: d(f(x_hi, t_m), stopgrad f(x_lo, t_n)) -- global x0 consistency between adjacent milestones;
    at t_n = 0 the target is x_lo itself (the boundary condition f(x, 0) = x).

    compare="jump" measures the same two x0 after the DDIM jump from x_hi to t_n, i.e. the x0 error scaled by
    a_n - s_n a_m / s_m: what a milestone's error moves the sampler's next state by (lcd.compare)."""
    x0_hi, _ = student(batch.x_hi, batch.t_hi, batch.cond)
    with torch.no_grad():
        x0_lo, _ = student(batch.x_lo, batch.t_lo, batch.cond)
        at_zero = (batch.t_lo == 0).reshape(-1, *([1] * (batch.x_lo.ndim - 1)))
        target = torch.where(at_zero, batch.x_lo, x0_lo)
    if compare == "jump":
        sch = student.schedule
        return consistency_loss(ddim(sch, batch.x_hi, x0_hi, batch.t_hi, batch.t_lo),
                                ddim(sch, batch.x_hi, target, batch.t_hi, batch.t_lo), distance)
    return consistency_loss(x0_hi, target, distance)


def run(ctx: StageContext) -> dict:
    lc = ctx.cfg.lcd
    return train_consistency(ctx, lc, partial(lcd_loss, compare=lc.compare), init_input="init",
                             anchor_weight=lc.mlcd_weight, anchor_batch_size=lc.anchor_batch_size)


def _inputs(cfg) -> dict[str, str]:
    """The student's pairs and stage-1 LoRA; the teacher's pairs too when MLCD's loss anchors LCD."""
    inputs = with_latent_lpips("lcd", {"pairs": "lcd-trajectories", "init": "mlcd"})(cfg)
    return {**inputs, "anchor": "teacher-trajectories"} if cfg.lcd.mlcd_weight else inputs


STAGE = Stage("lcd", version=2, run=run, reads=trainer_reads("lcd"), uses=trainer_uses("lcd"), inputs=_inputs,
              trains=True, splits_on_cpu=True, makes_lora=True)
