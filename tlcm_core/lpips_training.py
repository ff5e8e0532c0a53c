"""Stage `latent-lpips`: weights for the latent LPIPS distance (docs/method.md "Stage 3"; TLCM "bag of techniques").

Three sources (config section `latent_lpips`):
- file: a state dict (the published `latent-lpips.pth` or our safetensors), checked and re-saved;
- bapps: train on BAPPS 2AFC triplets (`{root}/{split}/{subset}/{ref,p0,p1,judge}/`), images encoded to latents
  with the teacher's VAE, LPIPS' ranking loss (Zhang et al. 2018, section 3.3); reports 2AFC agreement on val;
- datafree: regress a pixel metric of VAE-decoded latent pairs. Anchors are the teacher's CFG x0 predictions
  at x_hi, recovered exactly from the cached pair by inverting its DDIM jump (`x0_from_pair`); each pair is an
  anchor and a perturbed copy (latent noise, interpolation toward another anchor, latent blur, spatial shift)
  with a random strength, so the distances span pixel-level to semantic changes. Both are decoded with the
  teacher's VAE, the pixel metric (lpips-vgg, or the toy evaluator's features in the toy world) labels the pair,
  and latent LPIPS is fit to it (MSE on log distances plus MSE on the scaled values). Held-out anchors give the
  reported correlation.

The artifact holds `latent_lpips.safetensors`, `metrics.json` and `train_log.jsonl`; `resolve_latent_lpips`
turns a config (and that artifact) into the `Distance` the consistency trainers take.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import PipelineConfig
from .models import encode_images
from .losses import Distance
from .losses.latent_lpips import LatentLPIPS, RankingHead, load_latent_lpips, twoafc_score
from .progress import Reporter

WEIGHTS_FILE = "latent_lpips.safetensors"
PixelDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # images in [0, 1] -> (B,)
PAIR_KINDS = ("noise", "mix", "blur", "shift")


# ---------------------------------------------------------------------------------------------------------------------
# Pixel metrics (the regression targets of the data-free option)


def lpips_vgg_distance(device: torch.device | str = "cpu", pnet_rand: bool = False) -> PixelDistance:
    """Pixel LPIPS(vgg) of the `lpips` package on images in [0, 1]. `pnet_rand=True` (a random backbone) is for
    tests of the code path only: it is not a perceptual metric."""
    import lpips

    try:
        model = lpips.LPIPS(net="vgg", pnet_rand=pnet_rand, verbose=False)
    except Exception as e:  # noqa: BLE001 - torchvision's download of the backbone
        raise RuntimeError(
            "latent_lpips.pixel_distance=lpips-vgg needs torchvision's VGG-16 ImageNet weights (vgg16-397923af.pth in "
            f"{torch.hub.get_dir()}/checkpoints), which could not be loaded ({type(e).__name__}: {e}); copy the file "
            "there, or use pixel_distance=toy-features in the toy world") from None
    model = model.to(device).eval().requires_grad_(False)
    return lambda a, b: model(a.to(device), b.to(device), normalize=True).flatten().float()


def toy_feature_distance(evaluator) -> PixelDistance:
    """The toy world's perceptual metric: LPIPS' unlearned baseline (unit-normalized features, squared difference
    summed over channels, averaged over space, summed over layers) on the toy evaluator's conv stages (the block
    before each pool and the last block) plus its penultimate features -- the layers `features()` is built from."""
    body = evaluator.body
    taps = [i for i in range(len(body)) if i + 1 == len(body) or isinstance(body[i + 1], torch.nn.MaxPool2d)]

    def layers(images: torch.Tensor) -> list[torch.Tensor]:
        p = next(evaluator.parameters())
        h = images.to(p.device, p.dtype) * 2 - 1  # as ToyEvaluator._trunk
        out = []
        for i, m in enumerate(body):
            h = m(h)
            if i in taps:
                out.append(h)
        out.append(evaluator.pooled_features(h)[:, :, None, None])
        return out

    @torch.no_grad()
    def d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from .losses.latent_lpips import normalize_tensor

        total = 0.0
        for fa, fb in zip(layers(a), layers(b)):
            total = total + (normalize_tensor(fa.float()) - normalize_tensor(fb.float())).pow(2).sum(1).mean((1, 2))
        return total

    return d


def make_pixel_distance(cfg: PipelineConfig, device: torch.device) -> tuple[PixelDistance, str]:
    name = cfg.latent_lpips.pixel_distance
    if name == "auto":
        name = "toy-features" if cfg.teacher.toy_world else "lpips-vgg"
    if name == "lpips-vgg":
        return lpips_vgg_distance(device), name
    from .toy import ToyEvaluator, toy_evaluator_path

    world = cfg.teacher.toy_world or "toy"
    if not toy_evaluator_path(world).is_file():
        raise FileNotFoundError(f"pixel_distance=toy-features needs the toy evaluator of world {world!r} at "
                                f"{toy_evaluator_path(world)}; it is not there (build the toy assets first)")
    return toy_feature_distance(ToyEvaluator.load(world).to(device)), name


# ---------------------------------------------------------------------------------------------------------------------
# Data-free pairs


def x0_from_pair(schedule, x_hi: torch.Tensor, x_lo: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's x0 at x_hi, recovered from the cached DDIM jump x_lo = a_lo x0 + s_lo (x_hi - a_hi x0)/s_hi:
    x0 = (s_hi x_lo - s_lo x_hi) / (a_lo s_hi - s_lo a_hi). Returns (x0, amplification) where amplification =
    (s_hi + s_lo) / (a_lo s_hi - s_lo a_hi) bounds how much storage rounding of x_hi/x_lo is magnified."""
    x_hi, x_lo = x_hi.double(), x_lo.double()
    a_hi, s_hi = schedule.coeffs(t_hi, x_hi)
    a_lo, s_lo = schedule.coeffs(t_lo, x_hi)
    den = a_lo * s_hi - s_lo * a_hi
    x0 = (s_hi * x_lo - s_lo * x_hi) / den
    return x0.float(), ((s_hi + s_lo) / den).flatten().float()


def read_anchors(pairs_art, schedule, max_anchors: int | None = None, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Teacher x0 estimates from a teacher-trajectories artifact, skipping samples whose inversion would magnify the
    storage rounding beyond ~0.5% of a unit latent (only float16 caches at high t)."""
    x_hi_arr = pairs_art.open_array("x_hi")
    n = x_hi_arr.shape[0]
    idx = np.arange(n)
    if max_anchors is not None and max_anchors < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_anchors, replace=False))
    sel = (idx,)
    x_hi = torch.from_numpy(np.asarray(x_hi_arr.get_orthogonal_selection(sel))).float()
    x_lo = torch.from_numpy(np.asarray(pairs_art.open_array("x_lo").get_orthogonal_selection(sel))).float()
    t_hi = torch.from_numpy(np.asarray(pairs_art.open_array("t_hi").get_orthogonal_selection(sel))).long()
    t_lo = torch.from_numpy(np.asarray(pairs_art.open_array("t_lo").get_orthogonal_selection(sel))).long()
    x0, amp = x0_from_pair(schedule, x_hi, x_lo, t_hi, t_lo)
    eps = float(np.finfo(x_hi_arr.dtype).eps)
    keep = (amp * eps <= 5e-3) & (t_lo < t_hi) & torch.isfinite(x0).flatten(1).all(1)
    info = {"cached_samples": int(n), "read": len(idx), "anchors": int(keep.sum()),
            "dropped_imprecise": int((~keep).sum()), "storage_dtype": str(x_hi_arr.dtype)}
    if int(keep.sum()) < 8:
        raise ValueError(f"{pairs_art.uri}: only {int(keep.sum())} usable anchors out of {len(idx)}; "
                         "store trajectories in float32 or compute more samples")
    return x0[keep], info


def _translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift by (dy, dx) latent pixels, edges replicated (no wrap-around)."""
    h, w = x.shape[-2:]
    p = F.pad(x[None], (abs(dx), abs(dx), abs(dy), abs(dy)), mode="replicate")[0]
    return p[..., abs(dy) - dy: abs(dy) - dy + h, abs(dx) - dx: abs(dx) - dx + w]


def perturb(a: torch.Tensor, other: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """A perturbed copy of latent `a` (C, h, w) with a random strength; `other` is another anchor (for `mix`)."""
    u = float(torch.rand((), generator=g))
    if kind == "noise":  # latent noise, sigma log-uniform in [0.03, 1] of the latent's std
        sigma = math.exp(math.log(0.03) + u * (math.log(1.0) - math.log(0.03)))
        return a + sigma * a.std() * torch.randn(a.shape, generator=g)
    if kind == "mix":  # part of the way toward another sample's latent: content change
        return a + (0.05 + 0.95 * u) * (other - a)
    if kind == "blur":  # repeated 3x3 box blur, blended in
        b = a
        for _ in range(1 + int(torch.randint(0, 3, (), generator=g))):
            b = F.avg_pool2d(F.pad(b[None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]
        return a + (0.3 + 0.7 * u) * (b - a)
    if kind == "shift":
        r = max(1, a.shape[-1] // 8)
        while True:
            dy, dx = (int(v) for v in torch.randint(-r, r + 1, (2,), generator=g))
            if dy or dx:
                return _translate(a, dy, dx)
    raise ValueError(f"unknown pair kind {kind!r}; known: {', '.join(PAIR_KINDS)}")


def make_pairs(anchors: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n pairs (anchor, perturbed anchor) and their kind index into PAIR_KINDS; anchors drawn with replacement."""
    i = torch.randint(0, len(anchors), (n,), generator=g)
    j = torch.randint(0, len(anchors), (n,), generator=g)
    kind = torch.randint(0, len(PAIR_KINDS), (n,), generator=g)
    b = torch.stack([perturb(anchors[i[k]], anchors[j[k]], PAIR_KINDS[int(kind[k])], g) for k in range(n)])
    return anchors[i], b, kind


@torch.no_grad()
def label_pairs(a: torch.Tensor, b: torch.Tensor, vae_decode, pixel_distance: PixelDistance,
                batch_size: int = 32) -> torch.Tensor:
    """The pixel metric of the decoded pairs, (N,)."""
    out = []
    for k in range(0, len(a), batch_size):
        out.append(pixel_distance(vae_decode(a[k:k + batch_size]), vae_decode(b[k:k + batch_size])).float().cpu())
    return torch.cat(out)


def correlation(pred: torch.Tensor, target: torch.Tensor) -> dict:
    from scipy import stats

    p, t = pred.double().cpu().numpy(), target.double().cpu().numpy()
    return {"pearson": round(float(stats.pearsonr(p, t)[0]), 4), "spearman": round(float(stats.spearmanr(p, t)[0]), 4),
            "n": len(p)}


@torch.no_grad()
def _distances(model, a: torch.Tensor, b: torch.Tensor, device, batch_size: int = 256) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(a[k:k + batch_size].to(device), b[k:k + batch_size].to(device)).cpu()
                     for k in range(0, len(a), batch_size)])
    model.train(was)
    return out


def _latent_mse(a, b, device=None):
    return (a - b).pow(2).flatten(1).mean(1)


@dataclass
class FitResult:
    model: LatentLPIPS
    log: list[dict]
    metrics: dict


def fit_regression(model: LatentLPIPS, a, b, d, *, steps: int, lr: float, batch_size: int, seed: int,
                   device: torch.device, reporter: Reporter | None = None, log_every: int = 50,
                   raw_weight: float = 1.0) -> list[dict]:
    """Fit latent LPIPS to the pixel distances d: MSE on log(d + floor) (distances span orders of magnitude; the log
    weighs small and large ones alike: rank order) plus `raw_weight` x MSE on d / mean(d) (the values themselves:
    linear agreement); heads clamped >= 0 after every step (as LPIPS). On the toy world's VAE the two together
    gave held-out Pearson 0.89 / Spearman 0.97 where the log term alone gave 0.78 / 0.95 at equal steps."""
    floor = float(d[d > 0].median()) * 1e-2 if bool((d > 0).any()) else 1e-6
    target = torch.log(d + floor)
    scale = float(d.mean()) or 1.0
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))  # lpips' trainer settings
    g = torch.Generator().manual_seed(seed)
    def batch_loss() -> torch.Tensor:
        k = torch.randint(0, len(a), (min(batch_size, len(a)),), generator=g)
        pred = model(a[k].to(device), b[k].to(device))
        loss = F.mse_loss(torch.log(pred + floor), target[k].to(device))
        if raw_weight:
            loss = loss + raw_weight * F.mse_loss(pred / scale, d[k].to(device) / scale)
        return loss

    return _fit(model, opt, steps, batch_loss, log_every, reporter)


def _fit(model, opt, steps: int, batch_loss, log_every: int, reporter) -> list[dict]:
    """The optimisation loop both trainers share: a step on `batch_loss()`, heads clamped >= 0 (as LPIPS),
    a smoothed loss logged every `log_every` steps."""
    log, t0, run = [], time.time(), 0.0
    for step in range(1, steps + 1):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.clamp_heads()
        run = loss.item() if step == 1 else 0.95 * run + 0.05 * loss.item()
        if step % log_every == 0 or step == steps:
            log.append({"step": step, "loss": round(run, 5), "s": round(time.time() - t0, 1)})
            if reporter is not None:
                reporter.progress("latent-lpips", step, steps, loss=run)
    model.eval()
    return log


def train_latent_lpips_datafree(pairs_art, vae_decode, pixel_distance: PixelDistance, steps: int, *, schedule,
                                width: float = 1.0, num_pairs: int = 4096, val_fraction: float = 0.2, lr: float = 1e-4,
                                batch_size: int = 32, seed: int = 0, device: torch.device | str = "cpu",
                                reporter: Reporter | None = None, max_anchors: int | None = None,
                                log_every: int = 50) -> FitResult:
    """Data-free latent LPIPS: regress `pixel_distance` of VAE-decoded pairs built from the trajectory cache
    (module docstring). Anchors are split before pairing, so held-out pairs share no anchor with training ones."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    anchors, info = read_anchors(pairs_art, schedule, max_anchors=max_anchors, seed=seed)
    perm = torch.randperm(len(anchors), generator=g)
    n_val = max(4, int(round(len(anchors) * val_fraction)))
    val_anchors, train_anchors = anchors[perm[:n_val]], anchors[perm[n_val:]]
    n_val_pairs = max(16, int(round(num_pairs * val_fraction)))
    t0 = time.time()
    a_tr, b_tr, k_tr = make_pairs(train_anchors, num_pairs - n_val_pairs, g)
    a_va, b_va, k_va = make_pairs(val_anchors, n_val_pairs, g)
    d_tr = label_pairs(a_tr, b_tr, vae_decode, pixel_distance, batch_size)
    d_va = label_pairs(a_va, b_va, vae_decode, pixel_distance, batch_size)
    label_s = time.time() - t0
    torch.manual_seed(seed)
    model = LatentLPIPS(width=width, dropout=0.0).to(device)
    init = correlation(_distances(model, a_va, b_va, device), d_va)
    log = fit_regression(model, a_tr, b_tr, d_tr, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                         device=device, reporter=reporter, log_every=log_every)
    pred = _distances(model, a_va, b_va, device)
    per_kind = {PAIR_KINDS[k]: correlation(pred[k_va == k], d_va[k_va == k])
                for k in range(len(PAIR_KINDS)) if int((k_va == k).sum()) > 2}
    metrics = {
        "heldout": correlation(pred, d_va),
        "heldout_per_kind": per_kind,
        "train": correlation(_distances(model, a_tr[:1024], b_tr[:1024], device), d_tr[:1024]),
        "baseline_latent_mse": correlation(_latent_mse(a_va, b_va), d_va),
        "untrained_latent_lpips": init,
        "pairs": {"train": len(a_tr), "heldout": len(a_va), "kinds": list(PAIR_KINDS), **info},
        "label_seconds": round(label_s, 1),
        "train_seconds": log[-1]["s"] if log else 0.0,
    }
    return FitResult(model, log, metrics)


# ---------------------------------------------------------------------------------------------------------------------
# BAPPS 2AFC


@dataclass
class TwoAFC:
    """2AFC triplets: a reference and two distortions, judge = fraction of people who found p1 closer."""

    ref: torch.Tensor  # (N, C, H, W): images in [0, 1], or latents after `encode`
    p0: torch.Tensor
    p1: torch.Tensor
    judge: torch.Tensor  # (N,)
    subset: list[str]

    def __len__(self) -> int:
        return len(self.judge)

    def take(self, idx) -> TwoAFC:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TwoAFC(self.ref[idx], self.p0[idx], self.p1[idx], self.judge[idx],
                      [self.subset[i] for i in idx.tolist()])

    def encode(self, vae, batch_size: int = 32) -> TwoAFC:
        return TwoAFC(encode_images(vae, self.ref, batch_size), encode_images(vae, self.p0, batch_size),
                      encode_images(vae, self.p1, batch_size), self.judge, self.subset)


def _decode_png(data: bytes, image_size: int | None) -> torch.Tensor:
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    if image_size is not None and tuple(t.shape[1:]) != (image_size, image_size):
        t = F.interpolate(t[None], size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)[0].clamp(0, 1)
    return t


def read_bapps(url: str, split: str = "train", *, max_triplets: int = 0, image_size: int | None = None,
               seed: int = 0, storage_options: dict | None = None) -> TwoAFC:
    """BAPPS 2AFC triplets of one split: `{url}/{split}/{subset}/{ref,p0,p1}/NAME.png` and `judge/NAME.npy`.

    `url` is any fsspec URL (chained into an archive too). `max_triplets` > 0 keeps a seeded random subset."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    base = f"{root.rstrip('/')}/{split}"
    if not fs.isdir(base):
        raise FileNotFoundError(f"BAPPS: no {split!r} split at {url} (expected {split}/<subset>/ref|p0|p1|judge/)")
    subsets = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(base, detail=True)
                     if e["type"] == "directory")
    items: list[tuple[str, str]] = []
    for sub in subsets:
        names = {}
        for part, ext in (("ref", ".png"), ("p0", ".png"), ("p1", ".png"), ("judge", ".npy")):
            d = f"{base}/{sub}/{part}"
            files = fs.ls(d, detail=False) if fs.isdir(d) else []
            names[part] = {f.rsplit("/", 1)[-1][:-len(ext)] for f in files if f.endswith(ext)}
        ref = names["ref"]
        for part in ("p0", "p1", "judge"):
            missing = sorted(ref - names[part])
            if missing:
                raise FileNotFoundError(f"BAPPS {split}/{sub}: {len(missing)} triplet(s) without {part}/, e.g. "
                                        f"{missing[:3]}; every ref/NAME.png needs p0/NAME.png, p1/NAME.png and "
                                        "judge/NAME.npy")
        items += [(sub, n) for n in sorted(ref)]
    if not items:
        raise FileNotFoundError(f"BAPPS: no triplets under {url}/{split} (subsets found: {subsets})")
    if 0 < max_triplets < len(items):
        keep = np.sort(np.random.default_rng(seed).choice(len(items), max_triplets, replace=False))
        items = [items[i] for i in keep]
    paths = [f"{base}/{s}/{p}/{n}{'.npy' if p == 'judge' else '.png'}" for s, n in items
             for p in ("ref", "p0", "p1", "judge")]
    blobs: dict[str, bytes] = {}
    for k in range(0, len(paths), 4096):  # fsspec fetches a list concurrently where it can
        chunk = paths[k:k + 4096]
        got = fs.cat(chunk)
        blobs.update(got if isinstance(got, dict) else {chunk[0]: got})
    ref, p0, p1, judge = [], [], [], []
    for s, n in items:
        ref.append(_decode_png(blobs[f"{base}/{s}/ref/{n}.png"], image_size))
        p0.append(_decode_png(blobs[f"{base}/{s}/p0/{n}.png"], image_size))
        p1.append(_decode_png(blobs[f"{base}/{s}/p1/{n}.png"], image_size))
        judge.append(float(np.load(io.BytesIO(blobs[f"{base}/{s}/judge/{n}.npy"]), allow_pickle=False).reshape(-1)[0]))
    sizes = {tuple(t.shape) for t in ref + p0 + p1}
    if len(sizes) != 1:
        raise ValueError(f"BAPPS {split}: images of several sizes {sorted(sizes)}; set latent_lpips.bapps_image_size")
    return TwoAFC(torch.stack(ref), torch.stack(p0), torch.stack(p1), torch.tensor(judge), [s for s, _ in items])


def score_2afc(distance, data: TwoAFC, device, batch_size: int = 256) -> dict:
    """2AFC agreement of a latent distance on (latent) triplets, overall and per subset."""
    d0, d1 = [], []
    with torch.no_grad():
        for k in range(0, len(data), batch_size):
            r = data.ref[k:k + batch_size].to(device)
            d0.append(distance(r, data.p0[k:k + batch_size].to(device)).float().cpu())
            d1.append(distance(r, data.p1[k:k + batch_size].to(device)).float().cpu())
    s = twoafc_score(torch.cat(d0), torch.cat(d1), data.judge)
    subsets = np.array(data.subset)
    out = {"2afc": round(float(s.mean()), 4), "n": len(data)}
    out["per_subset"] = {sub: round(float(s[torch.from_numpy(subsets == sub)].mean()), 4)
                         for sub in sorted(set(data.subset))}
    return out


def train_latent_lpips_2afc(train: TwoAFC, val: TwoAFC, *, width: float = 1.0, steps: int = 2000, lr: float = 1e-4,
                            batch_size: int = 32, seed: int = 0, device: torch.device | str = "cpu",
                            reporter: Reporter | None = None, log_every: int = 50) -> FitResult:
    """LPIPS training from scratch on latent triplets: d0 = d(ref, p0), d1 = d(ref, p1), a small ranking net maps
    (d0, d1) to the probability that a judge prefers p1, BCE against the judges (lpips' BCERankingLoss)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = LatentLPIPS(width=width, dropout=0.5).to(device)
    head = RankingHead().to(device)
    init = score_2afc(model.eval(), val, device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))
    g = torch.Generator().manual_seed(seed)
    model.train()
    def batch_loss() -> torch.Tensor:
        k = torch.randint(0, len(train), (min(batch_size, len(train)),), generator=g)
        r = train.ref[k].to(device)
        d0, d1 = model(r, train.p0[k].to(device)), model(r, train.p1[k].to(device))
        return F.binary_cross_entropy_with_logits(head(d0, d1), train.judge[k].to(device).float())

    log = _fit(model, opt, steps, batch_loss, log_every, reporter)
    metrics = {"val": score_2afc(model, val, device),
               "train": score_2afc(model, train.take(range(min(len(train), 2048))), device),
               "untrained_latent_lpips": init, "baseline_latent_mse": score_2afc(_latent_mse, val, device),
               "majority_ceiling": round(float(torch.maximum(val.judge, 1 - val.judge).mean()), 4),
               "triplets": {"train": len(train), "val": len(val)}, "train_seconds": log[-1]["s"] if log else 0.0}
    return FitResult(model, log, metrics)


def bapps_splits(url: str, *, max_triplets: int, image_size: int | None, val_fraction: float, seed: int
                 ) -> tuple[TwoAFC, TwoAFC, str]:
    """train and val triplets; without a val/ split, a seeded share of train is held out."""
    import fsspec

    train = read_bapps(url, "train", max_triplets=max_triplets, image_size=image_size, seed=seed)
    fs, root = fsspec.core.url_to_fs(url)
    if fs.isdir(f"{root.rstrip('/')}/val"):
        return train, read_bapps(url, "val", max_triplets=max_triplets, image_size=image_size, seed=seed), "val"
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(train) * val_fraction)))
    return train.take(perm[n_val:]), train.take(perm[:n_val]), "held-out share of train"


# ---------------------------------------------------------------------------------------------------------------------
# The stage and the trainer's hook


def resolve_latent_lpips(cfg: PipelineConfig, store, artifact=None, device: torch.device | str = "cpu"
                         ) -> Distance | None:
    """The latent LPIPS distance for a trainer: from `latent_lpips.weights` when source=file, else from the
    `latent-lpips` artifact (an Artifact or its URI in `store`); None when there is neither."""
    lc = cfg.latent_lpips
    if lc.source == "file":
        return load_latent_lpips(lc.weights, device=device)
    if artifact is None:
        return None
    art = store.open_uri(artifact) if isinstance(artifact, str) else artifact
    return load_latent_lpips(art.read_bytes(WEIGHTS_FILE), device=device, where=f"{art.uri}/{WEIGHTS_FILE}")
