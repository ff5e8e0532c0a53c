"""Stage `mlcd`: multistep latent consistency distillation from cached teacher pairs (TLCM section 4.1)."""

from __future__ import annotations

import torch

from ..consistency import train_consistency
from ..losses import consistency_loss
from ..models import Denoiser
from ..pairs import Batch
from ..schedule import ddim
from ..stage import Stage, StageContext
from .common import trainer_reads, trainer_uses, with_latent_lpips


def mlcd_loss(student: Denoiser, batch: Batch, distance) -> torch.Tensor:
    """TLCM eq. 7: d(g(x_hi, t_hi, t_step), stopgrad g(x_lo, t_lo, t_step)), g = DDIM jump of the student's x0
    to the segment's lower boundary; g is the identity where t_lo is the boundary itself."""
    sch = student.schedule
    x0_hi, _ = student(batch.x_hi, batch.t_hi, batch.cond)
    pred = ddim(sch, batch.x_hi, x0_hi, batch.t_hi, batch.t_step)
    with torch.no_grad():
        x0_lo, _ = student(batch.x_lo, batch.t_lo, batch.cond)
        target = ddim(sch, batch.x_lo, x0_lo, batch.t_lo, batch.t_step)
    return consistency_loss(pred, target, distance)


def run(ctx: StageContext) -> dict:
    return train_consistency(ctx, ctx.cfg.mlcd, mlcd_loss)


STAGE = Stage("mlcd", version=2, run=run, reads=trainer_reads("mlcd"), uses=trainer_uses("mlcd"),
              inputs=with_latent_lpips("mlcd", {"pairs": "teacher-trajectories"}), trains=True, makes_lora=True)
