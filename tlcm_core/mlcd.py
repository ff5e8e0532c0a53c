"""Stage `mlcd`: multistep latent consistency distillation from cached teacher pairs (TLCM section 4.1)."""

from __future__ import annotations

from .config import PipelineConfig
from .consistency import train_consistency_stage
from .progress import Reporter


def run_mlcd(cfg: PipelineConfig, pairs_art, out_art, reporter: Reporter, lpips_art=None) -> dict:
    return train_consistency_stage(cfg, cfg.mlcd, name="mlcd", pairs_art=pairs_art, out_art=out_art, loss="mlcd",
                                   reporter=reporter, lpips_uri=lpips_art.uri if lpips_art is not None else None)
