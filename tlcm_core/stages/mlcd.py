"""Stage `mlcd`: multistep latent consistency distillation from cached teacher pairs (TLCM section 4.1)."""

from __future__ import annotations

from ..consistency import mlcd_loss, train_consistency
from ..stage import Stage, StageContext
from .common import trainer_reads, trainer_uses, with_latent_lpips


def run(ctx: StageContext) -> dict:
    return train_consistency(ctx, ctx.cfg.mlcd, mlcd_loss)


STAGE = Stage("mlcd", version=2, run=run, reads=trainer_reads("mlcd"), uses=trainer_uses("mlcd"),
              inputs=with_latent_lpips("mlcd", {"pairs": "teacher-trajectories"}), trains=True, splits_on_cpu=True, makes_lora=True)
