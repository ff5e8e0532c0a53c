"""Train the toy SDXL-shaped teacher: the VAE first, then the UNet (eps-prediction, SDXL schedule).

Phases (each checkpointed and resumable under ``out_dir/checkpoints``):
1. ``vae``: AutoencoderKL on the world's images (L1 + MSE + a small KL), then ``scaling_factor`` is set
   to 1 / std of the latents of the training set (unit-variance latents, as SD/SDXL do).
2. ``unet``: epsilon prediction with the SDXL schedule (scaled_linear 0.00085..0.012, T = 1000),
   uniform timesteps, min-SNR loss weighting (training-side only; the shipped schedule is SDXL's),
   ``prompt_dropout`` of the prompts replaced by the empty prompt "" (the unconditional that
   ``pipe.encode_prompt`` gives with ``force_zeros_for_empty_prompt=False``), EMA weights.
The text encoders stay frozen at their random (seeded) init; the conditioning of every prompt and of ""
is computed once with ``pipe.encode_prompt`` -- exactly what the pipeline feeds the UNet at sampling.

Checkpoints: ``checkpoints/init/`` (the random pipeline, saved once), ``checkpoints/vae-0000500/`` and
``checkpoints/unet-0001000/`` with ``*.safetensors`` weights and ``state.pt`` (optimizer, step, RNG;
tensors and primitives only, loadable with ``torch.load(weights_only=True)``). Written to a temporary
folder then renamed, so a checkpoint folder is complete or absent. The result is
``out_dir/pipeline`` (``save_pretrained(..., safe_serialization=True)``) plus ``out_dir/settings.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from .data import get_world

__all__ = ["ToyTeacherSettings", "train_toy_teacher", "latest_checkpoint"]

Progress = Callable[[str, int, int, dict], None]


class TeacherTrainingSettings(BaseModel):
    """What every toy teacher's training shares: the world, the data, and the fields `train_denoiser` reads."""

    model_config = ConfigDict(extra="forbid")

    world: str = "toy"
    seed: int = 0
    n_train: int = Field(40_000, ge=16, description="procedural training images (world.sample(n_train, seed))")
    warmup_steps: int = 100
    min_lr_ratio: float = Field(0.1, description="cosine decay of the lr to this fraction")
    ema_decay: float = 0.999
    prompt_dropout: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float = 1.0
    checkpoint_every: int = Field(250, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(25, ge=1)


class ToyTeacherSettings(TeacherTrainingSettings):
    # VAE
    vae_steps: int = Field(1500, ge=0)
    vae_batch_size: int = Field(32, ge=1)
    vae_lr: float = 1e-3
    vae_kl_weight: float = Field(1e-4, description="weight of the per-element KL(q(z|x) || N(0,1))")
    scale_samples: int = Field(4096, ge=16, description="training images used to estimate scaling_factor")
    # UNet
    unet_steps: int = Field(3000, ge=0)
    unet_batch_size: int = Field(64, ge=1)
    unet_lr: float = 1e-3
    unet_weight_decay: float = 0.0
    snr_gamma: float | None = Field(5.0, description="min-SNR loss weighting; None: plain MSE")

    @classmethod
    def for_world(cls, world: str = "toy", **overrides) -> "ToyTeacherSettings":
        """The settings the world's shipped teacher was trained with (``WORLD_TEACHER_SETTINGS``), then overrides."""
        return cls(**{**WORLD_TEACHER_SETTINGS.get(world, {}), "world": world, **overrides})


# What differs from the defaults for each world's shipped teacher. toy-hard has 400 prompts and four attributes:
# more images (150 per prompt) and a longer UNet schedule (~1 CPU-hour in all).
WORLD_TEACHER_SETTINGS: dict[str, dict] = {"toy": {}, "toy-hard": {"n_train": 60_000, "unet_steps": 4000}}


# ----------------------------------------------------------------------------------- checkpoints


def _ckpt_name(phase: str, step: int) -> str:
    return f"{phase}-{step:07d}"


def latest_checkpoint(ckpt_dir: Path, phase: str) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete checkpoint of ``phase`` or None."""
    best = None
    if not ckpt_dir.exists():
        return None
    for p in ckpt_dir.iterdir():
        if p.is_dir() and p.name.startswith(phase + "-") and (p / "state.pt").exists():
            try:
                step = int(p.name.split("-", 1)[1])
            except ValueError:
                continue
            if best is None or step > best[0]:
                best = (step, p)
    return best


def _write_checkpoint(ckpt_dir: Path, phase: str, step: int, weights: dict[str, dict], state: dict, keep: int) -> Path:
    final = ckpt_dir / _ckpt_name(phase, step)
    tmp = ckpt_dir / f".tmp-{_ckpt_name(phase, step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, sd in weights.items():
        save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    # prune old checkpoints of this phase
    olds = sorted(
        (p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(phase + "-")), key=lambda p: p.name
    )
    for p in olds[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _rng_state(g: torch.Generator) -> dict:
    return {"generator": g.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(g: torch.Generator, st: dict) -> None:
    g.set_state(st["generator"])
    torch.set_rng_state(st["torch"])


# ------------------------------------------------------------------------------------- helpers


def _lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if total <= warmup:
        return base
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def _default_progress() -> tuple[Progress, Callable[[], None]]:
    from tqdm.auto import tqdm

    bars: dict[str, tqdm] = {}

    def cb(phase: str, step: int, total: int, metrics: dict) -> None:
        bar = bars.get(phase)
        if bar is None:
            for b in bars.values():
                b.close()
            bar = bars[phase] = tqdm(total=total, desc=f"toy teacher {phase}", initial=step - 1 if step > 0 else 0)
        bar.n = step
        if metrics:
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()}, refresh=False)
        bar.refresh()

    def close() -> None:
        for b in bars.values():
            b.close()

    return cb, close


def save_pipeline_atomically(pipe, dest: Path) -> None:
    """save_pretrained into a temp folder beside `dest`, then swap it in: a kill never leaves half a pipeline."""
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def _load_init_pipeline(ckpt_dir: Path, seed: int):
    from diffusers import StableDiffusionXLPipeline

    from .pipeline import build_toy_pipeline

    init = ckpt_dir / "init"
    if not (init / "model_index.json").exists():
        save_pipeline_atomically(build_toy_pipeline(seed), init)
    pipe = StableDiffusionXLPipeline.from_pretrained(init)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------- phases


def _train_vae(pipe, images: torch.Tensor, s: ToyTeacherSettings, ckpt_dir: Path, progress: Progress, resume: bool):
    vae = pipe.vae
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(s.seed * 1000 + 1)
    step = 0
    found = latest_checkpoint(ckpt_dir, "vae") if resume else None
    if found is not None:
        step, path = found
        vae.load_state_dict(load_file(str(path / "vae.safetensors")))
        st = torch.load(path / "state.pt", weights_only=True)
        opt.load_state_dict(st["optimizer"])
        _set_rng_state(g, st["rng"])
        assert int(st["step"]) == step
    vae.train()
    n = images.shape[0]
    last = {}
    t0 = time.time()
    while step < s.vae_steps:
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, s.vae_steps, s.vae_lr, s.warmup_steps, s.min_lr_ratio)
        idx = torch.randint(0, n, (s.vae_batch_size,), generator=g)
        x = images[idx] * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = mse + l1 + s.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), s.grad_clip)
        opt.step()
        step += 1
        last = {"loss": loss.item(), "mse": mse.item(), "kl": kl.item(), "s_per_step": (time.time() - t0) / step}
        if step % s.checkpoint_every == 0 or step == s.vae_steps:
            state = {"step": step, "optimizer": opt.state_dict(), "rng": _rng_state(g)}
            _write_checkpoint(ckpt_dir, "vae", step, {"vae": vae.state_dict()}, state, s.keep_checkpoints)
        progress("vae", step, s.vae_steps, last if (step % s.log_every == 0 or step == s.vae_steps) else {})
    vae.eval()
    return last


@torch.no_grad()
def _encode_all(vae, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        d = vae.encode(images[i : i + batch] * 2 - 1).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def _eps_loss(pred: torch.Tensor, eps: torch.Tensor, snr: torch.Tensor, snr_gamma: float | None):
    """The eps-prediction MSE, Min-SNR-weighted when snr_gamma is set; returns (loss, per-sample MSE)."""
    per = (pred - eps).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per.mean(), per
    return (torch.clamp(snr, max=snr_gamma) / snr * per).mean(), per


@torch.no_grad()
def _ema_update(ema: dict, model: torch.nn.Module, decay: float) -> None:
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        else:
            ema[k].copy_(v)


def train_denoiser(net: torch.nn.Module, phase: str, batch_loss: Callable, *, steps: int, lr: float,
                   weight_decay: float, seed: int, s: TeacherTrainingSettings, ckpt_dir: Path, progress: Progress,
                   resume: bool) -> dict:
    """The teachers' training loop: AdamW with warmup + cosine lr, gradient clipping, EMA weights, checkpoints
    (`phase-NNNNNNN/` with the network, its EMA and the optimizer/RNG state) and resume. `batch_loss(g, step)`
    draws one batch from the generator `g` and returns (loss, per-sample MSE). `s` gives the shared bookkeeping
    fields (TeacherTrainingSettings: the lr schedule, EMA, clipping, checkpoints, logging). The
    network ends with its EMA weights, in eval mode."""
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    step = 0
    found = latest_checkpoint(ckpt_dir, phase) if resume else None
    if found is not None:
        step, path = found
        net.load_state_dict(load_file(str(path / f"{phase}.safetensors")))
        ema = load_file(str(path / "ema.safetensors"))
        st = torch.load(path / "state.pt", weights_only=True)
        opt.load_state_dict(st["optimizer"])
        _set_rng_state(g, st["rng"])
        assert int(st["step"]) == step
    net.train()
    last = {}
    t0 = time.time()
    start = step
    while step < steps:
        lr_now = _lr_at(step, steps, lr, s.warmup_steps, s.min_lr_ratio)
        for pg in opt.param_groups:
            pg["lr"] = lr_now
        loss, per = batch_loss(g, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), s.grad_clip)
        opt.step()
        step += 1
        _ema_update(ema, net, min(s.ema_decay, (1 + step) / (10 + step)))
        last = {"loss": loss.item(), "mse": per.mean().item(), "lr": lr_now,
                "s_per_step": (time.time() - t0) / (step - start)}
        if step % s.checkpoint_every == 0 or step == steps:
            state = {"step": step, "optimizer": opt.state_dict(), "rng": _rng_state(g)}
            _write_checkpoint(ckpt_dir, phase, step, {phase: net.state_dict(), "ema": ema}, state, s.keep_checkpoints)
        progress(phase, step, steps, last if (step % s.log_every == 0 or step == steps) else {})
    net.load_state_dict(ema)
    net.eval()
    return last


def _train_unet(pipe, lat_mean, lat_std, pidx, s: ToyTeacherSettings, ckpt_dir: Path, progress: Progress, resume: bool):
    from .pipeline import TOY_TIME_IDS

    world = get_world(s.world)
    unet = pipe.unet
    sf = float(pipe.vae.config.scaling_factor)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(world.prompts() + [""], do_classifier_free_guidance=False)
    pe, pooled = pe.detach(), pooled.detach()
    null = len(world.prompts())
    time_ids = torch.tensor([TOY_TIME_IDS], dtype=torch.float32)

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    sched = pipe.scheduler.config
    assert sched.beta_schedule == "scaled_linear" and sched.num_train_timesteps == 1000
    a_t, s_t = abar.sqrt().float(), (1 - abar).sqrt().float()
    snr = (abar / (1 - abar)).float()
    n, B = lat_mean.shape[0], s.unet_batch_size

    def batch_loss(g, step):
        idx = torch.randint(0, n, (B,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * sf
        t = torch.randint(0, 1000, (B,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        drop = torch.rand(B, generator=g) < s.prompt_dropout
        cond = torch.where(drop, torch.full_like(pidx[idx], null), pidx[idx])
        xt = a_t[t].view(B, 1, 1, 1) * z0 + s_t[t].view(B, 1, 1, 1) * eps
        pred = unet(xt, t, encoder_hidden_states=pe[cond],
                    added_cond_kwargs={"text_embeds": pooled[cond], "time_ids": time_ids.expand(B, -1)}).sample
        return _eps_loss(pred, eps, snr[t], s.snr_gamma)

    return train_denoiser(unet, "unet", batch_loss, steps=s.unet_steps, lr=s.unet_lr,
                          weight_decay=s.unet_weight_decay, seed=s.seed * 1000 + 2, s=s, ckpt_dir=ckpt_dir,
                          progress=progress, resume=resume)


# ------------------------------------------------------------------------------------------ main


def run_teacher_training(s: TeacherTrainingSettings, out_dir: str | Path, progress: Progress | None, resume: bool,
                         body: Callable) -> Path:
    """What training either toy teacher shares: the finished-run check (`DONE.json` with the same settings: nothing
    to do), `settings.json`, the world's training images and their prompt indices, a progress bar unless `progress`
    is given, the atomic save of `out_dir/pipeline` and `DONE.json` with the timings. `body(ckpt_dir, images, pidx,
    progress)` trains and returns (the pipeline, the fields DONE.json records besides settings and timings)."""
    out = Path(out_dir)
    ckpt_dir, final, done_marker = out / "checkpoints", out / "pipeline", out / "DONE.json"
    if resume and done_marker.exists() and (final / "model_index.json").exists():
        if json.loads(done_marker.read_text()).get("settings") == s.model_dump(mode="json"):
            return final
    if not resume and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(s.model_dump(mode="json"), indent=2) + "\n")
    close = lambda: None  # noqa: E731
    if progress is None:
        progress, close = _default_progress()
    try:
        t_start, cpu_start = time.time(), time.process_time()
        world = get_world(s.world)
        images, prompts = world.sample(s.n_train, s.seed)
        index = {p: i for i, p in enumerate(world.prompts())}
        pidx = torch.tensor([index[p] for p in prompts], dtype=torch.long)
        pipe, info = body(ckpt_dir, images, pidx, progress)
        save_pipeline_atomically(pipe, final)
        done_marker.write_text(json.dumps({"settings": s.model_dump(mode="json"), **info,
                                           "wall_s_this_run": time.time() - t_start,
                                           "cpu_s_this_run": time.process_time() - cpu_start}, indent=2) + "\n")
        return final
    finally:
        close()


def train_toy_teacher(
    settings: ToyTeacherSettings,
    out_dir: str | Path,
    progress: Progress | None = None,
    resume: bool = True,
) -> Path:
    """Train (or resume) the toy teacher; returns ``out_dir/"pipeline"`` (a diffusers SDXL folder).

    ``progress(phase, step, total, metrics)`` is called after every step (``metrics`` is non-empty
    every ``log_every`` steps); an exception raised by it stops training (the last checkpoint stays).
    With ``resume=False`` existing checkpoints are ignored (and overwritten).
    """
    s = settings

    def body(ckpt_dir: Path, images: torch.Tensor, pidx: torch.Tensor, progress: Progress):
        pipe = _load_init_pipeline(ckpt_dir, s.seed)
        for m in (pipe.text_encoder, pipe.text_encoder_2):
            m.requires_grad_(False)
        vae_metrics = _train_vae(pipe, images, s, ckpt_dir, progress, resume)
        if s.vae_steps == 0 and (found := latest_checkpoint(ckpt_dir, "vae")) is not None:
            pipe.vae.load_state_dict(load_file(str(found[1] / "vae.safetensors")))
        pipe.vae.requires_grad_(False)
        lat_mean, lat_std = _encode_all(pipe.vae, images)
        k = min(s.scale_samples, images.shape[0])
        gs = torch.Generator().manual_seed(s.seed * 1000 + 3)
        z = lat_mean[:k] + lat_std[:k] * torch.randn(lat_mean[:k].shape, generator=gs)
        scaling = float(1.0 / z.float().std())
        pipe.vae.register_to_config(scaling_factor=scaling)
        unet_metrics = _train_unet(pipe, lat_mean, lat_std, pidx, s, ckpt_dir, progress, resume)
        return pipe, {"scaling_factor": scaling, "latent_mean": float(z.mean()), "vae": vae_metrics,
                      "unet": unet_metrics}

    return run_teacher_training(s, out_dir, progress, resume, body)
