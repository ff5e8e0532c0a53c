"""Distances and losses for consistency distillation."""

from __future__ import annotations

from typing import Callable

import torch

from .latent_lpips import LatentLPIPS, LatentLPIPSWeightsError, load_latent_lpips, save_latent_lpips

__all__ = ["Distance", "LatentLPIPS", "LatentLPIPSWeightsError", "consistency_loss", "load_latent_lpips",
           "make_distance", "mse", "pseudo_huber", "save_latent_lpips"]

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pred, target) -> per-sample (B,)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared L2 per sample, averaged over elements (TLCM eq. 7/10 with d = ||.||^2)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def pseudo_huber(c: float) -> Distance:
    """sqrt(||x - y||^2 + c^2) - c per sample (Song & Dhariwal 2023), with ||.|| over the mean-squared elements."""

    def d(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sq = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return (sq + c * c).sqrt() - c

    return d


def make_distance(name: str, huber_c: float = 0.001, latent_lpips: Distance | None = None) -> Distance:
    if name == "mse":
        return mse
    if name == "huber":
        return pseudo_huber(huber_c)
    if name == "latent-lpips":
        if latent_lpips is None:
            raise ValueError("distance 'latent-lpips' needs latent LPIPS weights; none were given")
        return latent_lpips
    raise ValueError(f"unknown distance {name!r}; use mse, huber or latent-lpips")


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, distance: Distance) -> torch.Tensor:
    """MLCD loss, TLCM eq. 7 (and eq. 10): d(g(x_hi), stopgrad g(x_lo)), averaged over the batch."""
    return distance(pred, target.detach()).mean()
