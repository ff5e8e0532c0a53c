"""Train the toy flow teacher: an SD3-shaped transformer by rectified flow on a toy world (flow_pipeline.py).

The VAE is the world's shipped UNet teacher's (already trained on the same images), so only the transformer trains:
velocity prediction `v = eps - x0` on `x_t = (1 - sigma) x0 + sigma eps`, sigmas drawn as SD3 trains them (logit-
normal, then the scheduler's shift), `prompt_dropout` of the prompts replaced by the empty prompt (the unconditional
of the pipeline's CFG), EMA weights. The text encoders stay frozen at their seeded random initialisation; every
prompt's conditioning (and the empty prompt's) is computed once with the pipeline's own `encode_prompt`.

Checkpoints and resume as the UNet teacher's (`checkpoints/transformer-NNNNNNN/`); the result is `out_dir/pipeline`
(a StableDiffusion3Pipeline folder) and `out_dir/DONE.json`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from ..errors import UserError
from .data import get_world
from .teacher import (Progress, TeacherTrainingSettings, _encode_all, run_teacher_training, save_pipeline_atomically,
                      train_denoiser)

__all__ = ["ToyFlowTeacherSettings", "train_toy_flow_teacher"]


class ToyFlowTeacherSettings(TeacherTrainingSettings):
    world: str = "toy-hard"
    n_train: int = Field(60_000, ge=16, description="procedural training images (world.sample(n_train, seed))")
    width: int = Field(128, ge=32, description="transformer width (heads x head_dim)")
    layers: int = Field(6, ge=1, description="joint (MMDiT) blocks")
    head_dim: int = Field(32, ge=8)
    steps: int = Field(4500, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = 6e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    logit_mean: float = Field(0.0, description="SD3's logit-normal timestep density: mean")
    logit_std: float = Field(1.0, gt=0, description="... and standard deviation")


def _init_pipeline(ckpt_dir: Path, s: ToyFlowTeacherSettings):
    from diffusers import StableDiffusion3Pipeline

    from . import toy_teacher_path
    from .flow_pipeline import build_toy_flow_pipeline

    init = ckpt_dir / "init"
    if not (init / "model_index.json").exists():
        pipe = build_toy_flow_pipeline(toy_teacher_path(s.world), s.seed, width=s.width, layers=s.layers,
                                       head_dim=s.head_dim)
        save_pipeline_atomically(pipe, init)
    pipe = StableDiffusion3Pipeline.from_pretrained(init)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train_transformer(pipe, lat_mean, lat_std, pidx, s: ToyFlowTeacherSettings, ckpt_dir: Path, progress: Progress,
                       resume: bool) -> dict:
    from .flow_pipeline import MAX_SEQUENCE_LENGTH

    net = pipe.transformer
    prompts = get_world(s.world).prompts()
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts + [""], prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=MAX_SEQUENCE_LENGTH)
    pe, pooled = pe.detach(), pooled.detach()
    null = len(prompts)
    scale = float(pipe.vae.config.scaling_factor)
    shift_factor = float(pipe.vae.config.shift_factor or 0.0)
    shift = float(pipe.scheduler.config.shift)
    n, B = lat_mean.shape[0], s.batch_size

    def batch_loss(g, step):
        idx = torch.randint(0, n, (B,), generator=g)
        z = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        x0 = (z - shift_factor) * scale
        u = torch.sigmoid(s.logit_mean + s.logit_std * torch.randn(B, generator=g))
        sigma = (shift * u / (1 + (shift - 1) * u)).view(B, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        drop = torch.rand(B, generator=g) < s.prompt_dropout
        cond = torch.where(drop, torch.full_like(pidx[idx], null), pidx[idx])
        x_t = (1 - sigma) * x0 + sigma * eps
        pred = net(hidden_states=x_t, timestep=sigma.flatten() * 1000, encoder_hidden_states=pe[cond],
                   pooled_projections=pooled[cond]).sample
        per = (pred - (eps - x0)).pow(2).mean(dim=(1, 2, 3))
        return per.mean(), per

    return train_denoiser(net, "transformer", batch_loss, steps=s.steps, lr=s.lr, weight_decay=s.weight_decay,
                          seed=s.seed * 1000 + 4, s=s, ckpt_dir=ckpt_dir, progress=progress, resume=resume)


def train_toy_flow_teacher(settings: ToyFlowTeacherSettings, out_dir: str | Path, progress: Progress | None = None,
                           resume: bool = True) -> Path:
    """Train (or resume) the toy flow teacher; returns `out_dir/"pipeline"` (a diffusers SD3 folder). `progress` and
    `resume` as `train_toy_teacher`. The world's UNet teacher must be there: its VAE is the flow teacher's."""
    from . import toy_teacher_path

    s = settings
    if not (toy_teacher_path(s.world) / "vae").is_dir():
        raise UserError(f"the flow teacher takes the VAE of world {s.world!r}'s UNet teacher, which is not at "
                        f"{toy_teacher_path(s.world)} (train it first: tlcm toy-teacher --world {s.world})")

    def body(ckpt_dir: Path, images: torch.Tensor, pidx: torch.Tensor, progress: Progress):
        pipe = _init_pipeline(ckpt_dir, s)
        for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            getattr(pipe, part).requires_grad_(False)
        lat_mean, lat_std = _encode_all(pipe.vae, images)
        return pipe, {"transformer": _train_transformer(pipe, lat_mean, lat_std, pidx, s, ckpt_dir, progress, resume)}

    return run_teacher_training(s, out_dir, progress, resume, body)
