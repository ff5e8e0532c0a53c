"""Consistency distillation from cached pairs: the losses of stage 1 (MLCD, TLCM eq. 7) and stage 2 (LCD,
eq. 10) and the one trainer both stages share.

The teacher is never run here: x_hi and x_lo come from the pair cache. The student is the teacher's UNet with
a LoRA; the target is the same weights without grad (no EMA).
"""

from __future__ import annotations

import json

import torch

from .config import PipelineConfig, TrainerConfig
from .losses import consistency_loss, make_distance
from .lora import (attach_lora, check_lora, load_lora_into, lora_metadata, lora_parameters, lora_state_dict)
from .models import Denoiser, load_schedule, load_unet, resolve_device, teacher_identity
from .progress import Reporter
from .schedule import ddim
from .train import Batch, Checkpointer, PairBatches, train_loop


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


def lcd_loss(student: Denoiser, batch: Batch, distance) -> torch.Tensor:
    """TLCM eq. 10: d(f(x_hi, t_m), stopgrad f(x_lo, t_n)) -- global x0 consistency between adjacent milestones;
    at t_n = 0 the target is x_lo itself (the boundary condition f(x, 0) = x)."""
    x0_hi, _ = student(batch.x_hi, batch.t_hi, batch.cond)
    with torch.no_grad():
        x0_lo, _ = student(batch.x_lo, batch.t_lo, batch.cond)
        at_zero = (batch.t_lo == 0).reshape(-1, *([1] * (batch.x_lo.ndim - 1)))
        target = torch.where(at_zero, batch.x_lo, x0_lo)
    return consistency_loss(x0_hi, target, distance)


LOSSES = {"mlcd": mlcd_loss, "lcd": lcd_loss}


def train_consistency_stage(cfg: PipelineConfig, tcfg: TrainerConfig, *, name: str, pairs_art, out_art,
                            loss: str, reporter: Reporter, init_lora_uri: str | None = None,
                            latent_lpips=None, lpips_uri: str | None = None, accelerator=None) -> dict:
    """Shared by MLCD and LCD: build the student, train from cached pairs, write lora.safetensors + train_log.

    With compute.num_processes > 1 (and no accelerator yet) the training runs under `accelerate launch` in
    that many processes (tlcm_core.distributed) and this process only waits for it.
    """
    if cfg.compute.num_processes > 1 and accelerator is None:
        from .distributed import launch_training

        return launch_training(cfg, name=name, pairs_art=pairs_art, out_art=out_art, loss=loss,
                               init_lora_uri=init_lora_uri, lpips_uri=lpips_uri)
    device = accelerator.device if accelerator is not None else resolve_device(cfg.compute)
    schedule = load_schedule(cfg.teacher)
    unet = load_unet(cfg.teacher, device, torch.float32)
    torch.manual_seed(cfg.compute.seed)  # PEFT draws the LoRA's initial weights from the global RNG
    if init_lora_uri is not None:  # continue the previous stage's LoRA (one LoRA through all stages)
        init = open_lora(cfg, init_lora_uri, pairs_art.store)
        load_lora_into(unet, init, cfg.lora)
    else:
        attach_lora(unet, cfg.lora)
    unet.train()
    params = lora_parameters(unet)
    if tcfg.distance == "latent-lpips" and latent_lpips is None:  # from latent_lpips.weights or the stage's artifact
        from .lpips_stage import resolve_latent_lpips

        latent_lpips = resolve_latent_lpips(cfg, pairs_art.store, lpips_uri, device=device)
    distance = make_distance(tcfg.distance, tcfg.huber_c, latent_lpips)
    data = PairBatches(pairs_art, tcfg.batch_size, seed=cfg.compute.seed, prefetch=tcfg.prefetch)
    if loss not in LOSSES:
        raise ValueError(f"unknown consistency loss {loss!r}; known: {', '.join(LOSSES)}")

    def loss_fn(model, batch):
        return LOSSES[loss](Denoiser(model, schedule), batch, distance)

    def set_lora(sd):
        load_lora_into(unet, sd, cfg.lora)

    torch.manual_seed(cfg.compute.seed)
    result = train_loop(tcfg, name=name, model=unet, params=params, loss_fn=loss_fn, batches=data.batches_from,
                        get_lora=lambda: lora_state_dict(unet), set_lora=set_lora, ckpt=Checkpointer(out_art),
                        reporter=reporter, device=device, dtype=cfg.compute.dtype, accelerator=accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return {}
    out_art.save_tensors("lora.safetensors", result.lora, metadata=lora_metadata(cfg.lora, teacher_identity(cfg.teacher)))
    out_art.write_bytes("train_log.jsonl", "".join(json.dumps(r) + "\n" for r in result.log).encode())
    reporter.table(f"{name}-loss", result.log, description=f"{name} training loss")
    last = result.log[-1]["loss"] if result.log else None
    return {"iterations": tcfg.iterations, "final_loss": last, "resumed_from_step": result.start_step,
            "steps_per_second": round(result.steps_per_second, 4)}


def open_lora(cfg: PipelineConfig, uri: str, store) -> dict[str, torch.Tensor]:
    """The LoRA of a LoRA-producing artifact, checked against the configured rank and base model."""
    art = store.open_uri(uri)
    state = art.load_tensors("lora.safetensors")
    check_lora(state, art.tensors_metadata("lora.safetensors"), cfg.lora, teacher_identity(cfg.teacher),
               where=art.uri)
    return state
