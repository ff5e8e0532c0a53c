"""The toy evaluator: a small CNN with one head per attribute of a world.

It stands in for CLIP score / FID / a preference model in the toy world:
- prompt accuracy: ``correct(images, prompts)`` (every attribute right);
- Frechet distance on its penultimate features: ``frechet_distance(ev.features(a), ev.features(b))``;
- a differentiable reward: ``reward(images, prompts)`` = sum over attributes of log p(attr | image).

It is trained on freshly rendered world images with augmentations that mimic generative artefacts
(background tint and low-frequency blotches, blur, down/up-sampling, noise, periodic patterns,
colour shifts), so it measures prompt following of generated images rather than their artefacts.
Images everywhere are float tensors in [0, 1] of shape (B, 3, H, W).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .data import World, get_world

__all__ = ["ToyEvaluator", "frechet_distance", "train_evaluator", "augment"]

_ASSETS = Path(__file__).parent / "assets"


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ToyEvaluator(nn.Module):
    """CNN classifier: conv stages -> pool -> feature layer (D) -> one head per attribute.

    ``pool="mean"`` averages the last 4x4 map (position-free: the one-object world); ``pool="flatten"``
    keeps it, so heads can tell where an object is (worlds whose attributes belong to image regions)."""

    def __init__(self, attributes: dict[str, list[str]], channels=(32, 64, 128), feature_dim: int = 128, world: str = "toy",
                 pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "flatten"):
            raise ValueError(f"pool must be 'mean' or 'flatten', got {pool!r}")
        self.world_name = world
        self.attributes = {k: list(v) for k, v in attributes.items()}
        self.channels = tuple(int(c) for c in channels)
        self.feature_dim = int(feature_dim)
        self.pool = pool
        c1, c2, c3 = self.channels
        self.body = nn.Sequential(
            _block(3, c1), _block(c1, c1), nn.MaxPool2d(2),  # 16x16
            _block(c1, c2), _block(c2, c2), nn.MaxPool2d(2),  # 8x8
            _block(c2, c3), nn.MaxPool2d(2),  # 4x4
            _block(c3, c3),
        )
        self.feat = nn.Sequential(nn.Linear(c3 * (16 if pool == "flatten" else 1), self.feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(self.feature_dim, len(v)) for k, v in self.attributes.items()})

    # ------------------------------------------------------------------------------ config / io
    def config(self) -> dict:
        return {
            "world": self.world_name,
            "attributes": self.attributes,
            "channels": list(self.channels),
            "feature_dim": self.feature_dim,
            "pool": self.pool,
        }

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write ``path`` (.safetensors) and the config next to it (same stem, .json)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path))
        cfg = self.config()
        if extra:
            cfg["training"] = extra
        path.with_suffix(".json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def load(cls, world: str = "toy", path: str | Path | None = None) -> "ToyEvaluator":
        """Load the shipped evaluator of ``world`` (or the one at ``path``); eval mode, no grad on params."""
        path = Path(path) if path is not None else _ASSETS / world / "evaluator.safetensors"
        cfg = json.loads(path.with_suffix(".json").read_text())
        model = cls(cfg["attributes"], cfg["channels"], cfg["feature_dim"], cfg.get("world", world), cfg.get("pool", "mean"))
        model.load_state_dict(load_file(str(path)))
        model.eval()
        model.requires_grad_(False)
        return model

    # ------------------------------------------------------------------------------------ model
    def _trunk(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        p = next(self.parameters())
        x = images.to(device=p.device, dtype=p.dtype) * 2 - 1
        return self.pooled_features(self.body(x))

    def pooled_features(self, h: torch.Tensor) -> torch.Tensor:
        """The feature layer on the body's last map [B, C, h, w] (mean-pooled, or its 4x4 layout kept)."""
        h = F.adaptive_avg_pool2d(h, 4).flatten(1) if self.pool == "flatten" else h.mean(dim=(2, 3))
        return self.feat(h)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.logits(images)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self._trunk(images)
        return {k: head(f) for k, head in self.heads.items()}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feature_dim] (for Frechet distance)."""
        return self._trunk(images)

    def labels(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        world = get_world(self.world_name)
        lab = world.labels(prompts)
        p = next(self.parameters())
        return {k: lab[:, i].to(p.device) for i, k in enumerate(world.attributes)}

    def hits(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per attribute, bool [B]: predicted right (one evaluator pass for every count below)."""
        with torch.no_grad():
            lg = self.logits(images)
        lab = self.labels(prompts)
        return {k: lg[k].argmax(dim=1) == lab[k] for k in self.attributes}

    @staticmethod
    def all_right(hits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bool [B] from ``hits``: every attribute right (what prompt accuracy counts)."""
        return torch.stack(list(hits.values())).all(dim=0)

    def correct(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Bool [B]: every attribute predicted right."""
        return self.all_right(self.hits(images, prompts))

    def attribute_accuracy(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Per-attribute accuracy and ``"all"`` (every attribute right)."""
        h = self.hits(images, prompts)
        out = {k: float(v.float().mean()) for k, v in h.items()}
        out["all"] = float(self.all_right(h).float().mean())
        return out

    def reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[B] sum over attributes of log p(attribute of the prompt | image); differentiable in images."""
        lg = self.logits(images)
        lab = self.labels(prompts)
        r = 0.0
        for k in self.attributes:
            r = r + F.log_softmax(lg[k], dim=1).gather(1, lab[k].view(-1, 1)).squeeze(1)
        return r


# ------------------------------------------------------------------------------------- FID


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ([N, D] each), in float64."""
    from scipy import linalg

    a = np.asarray(feats_a.detach().cpu() if isinstance(feats_a, torch.Tensor) else feats_a, dtype=np.float64)
    b = np.asarray(feats_b.detach().cpu() if isinstance(feats_b, torch.Tensor) else feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two [N>=2, D] feature sets, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # singular covariances (dead ReLU features) are expected
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- augmentations


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample gaussian blur (5x5 separable kernel), sigma [B]."""
    B = x.shape[0]
    r = torch.arange(-2, 3, dtype=x.dtype).view(1, -1)
    k = torch.exp(-(r**2) / (2 * sigma.clamp_min(1e-3).view(-1, 1) ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # [B, 5]
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    C = x.shape[1]
    w = k.repeat_interleave(C, 0)
    y = F.conv2d(xp.reshape(1, B * C, *xp.shape[2:]), w.view(B * C, 1, 1, 5), groups=B * C)
    y = F.conv2d(y, w.view(B * C, 1, 5, 1), groups=B * C)
    return y.view_as(x)


def augment(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random generative-artefact augmentations of images in [0, 1] (independent per sample)."""
    B, C, H, W = x.shape

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(B, *shape, generator=g)

    def coin(p):
        return (torch.rand(B, generator=g) < p * strength).float().view(B, 1, 1, 1)

    s = strength
    # colour shifts: per-channel gain, global brightness
    x = x * (1 + coin(0.5) * u(-0.1 * s, 0.1 * s, C, 1, 1)) * (1 + coin(0.5) * u(-0.15 * s, 0.1 * s, 1, 1, 1))
    # background tint: per-channel offset + low-frequency field (blotches)
    x = x + coin(0.5) * u(-0.08 * s, 0.1 * s, C, 1, 1)
    lf = F.interpolate(torch.randn(B, C, 4, 4, generator=g), size=(H, W), mode="bicubic", align_corners=False)
    x = x + coin(0.4) * u(0, 0.08 * s, 1, 1, 1) * lf
    # periodic patterns: checkerboard / stripes with period 2..4
    yy = torch.arange(H).view(1, 1, H, 1)
    xx = torch.arange(W).view(1, 1, 1, W)
    per = torch.randint(2, 5, (B, 1, 1, 1), generator=g)
    kind = torch.randint(0, 3, (B, 1, 1, 1), generator=g)
    phase_y = ((yy // (per // 2).clamp_min(1)) % 2).float() * 2 - 1
    phase_x = ((xx // (per // 2).clamp_min(1)) % 2).float() * 2 - 1
    pat = torch.where(kind == 0, phase_x * phase_y, torch.where(kind == 1, phase_x.expand(B, 1, H, W), phase_y.expand(B, 1, H, W)))
    x = x + coin(0.3) * u(0, 0.07 * s, C, 1, 1) * pat
    # blur or down/up-sampling
    blur = coin(0.3)
    xb = _gaussian_blur(x, u(0.3, 1.0 * max(s, 0.3)))
    x = blur * xb + (1 - blur) * x
    du = coin(0.15)
    xd = F.interpolate(F.avg_pool2d(x, 2), size=(H, W), mode="bilinear", align_corners=False)
    x = du * xd + (1 - du) * x
    # pixel noise
    x = x + coin(0.5) * u(0, 0.06 * s, 1, 1, 1) * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


# ---------------------------------------------------------------------------------- training


def evaluate_real(model: ToyEvaluator, world: World, n: int = 2048, seed: int = 999_983) -> dict[str, float]:
    images, prompts = world.sample(n, seed)
    was = model.training
    model.eval()
    accs = [model.attribute_accuracy(images[i : i + 512], prompts[i : i + 512]) for i in range(0, n, 512)]
    model.train(was)
    sizes = [min(512, n - i) for i in range(0, n, 512)]
    return {k: sum(a[k] * s for a, s in zip(accs, sizes)) / n for k in accs[0]}


def train_evaluator(
    world: str = "toy",
    out_path: str | Path | None = None,
    steps: int = 2000,
    seed: int = 0,
    progress: Callable[[str, int, int, dict], None] | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    clean_fraction: float = 0.25,
) -> ToyEvaluator:
    """Train the evaluator of ``world`` on freshly rendered, augmented images; save it to ``out_path``
    (``.safetensors`` + ``.json``) when given. ``progress(phase, step, total, metrics)`` as elsewhere."""
    torch.manual_seed(seed)
    w = get_world(world)
    model = ToyEvaluator(w.attributes, world=world, pool="flatten" if w.spatial else "mean")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    names = list(w.attributes)
    bar = None
    if progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"toy evaluator {world}")
    t0 = time.time()
    model.train()
    for step in range(steps):
        for pg in opt.param_groups:
            warm = min(1.0, (step + 1) / 100)
            pg["lr"] = lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        images, prompts = w.sample(batch_size, seed=10_000_000 + seed * 1_000_003 + step)
        k = int(batch_size * clean_fraction)
        images = torch.cat([images[:k], augment(images[k:], g)])
        lab = w.labels(prompts)
        lg = model.logits(images)
        loss = sum(F.cross_entropy(lg[n], lab[:, i], label_smoothing=0.05) for i, n in enumerate(names))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        m = {}
        if (step + 1) % 50 == 0 or step + 1 == steps:
            m = {"loss": loss.item(), "s_per_step": (time.time() - t0) / (step + 1)}
        if bar is not None:
            bar.update(1)
            if m:
                bar.set_postfix(m)
        else:
            progress("evaluator", step + 1, steps, m)
    if bar is not None:
        bar.close()
    model.eval()
    metrics = evaluate_real(model, w)
    model.requires_grad_(False)
    if out_path is not None:
        model.save(out_path, extra={"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
                                    "held_out_real_accuracy": metrics, "wall_s": time.time() - t0})
    model.train_metrics = metrics
    return model
