"""Consistency distillation from cached pairs, shared by MLCD (stage 1) and LCD (stage 2): the student, the
objective over the pair cache, and the write at the end of every training stage.

The teacher is never run here: x_hi and x_lo come from the pair cache (tlcm_core/pairs.py). The student is the
teacher's UNet with a LoRA; the target is the same weights without grad (no EMA). Each stage brings its loss
(tlcm_core/stages/mlcd.py: TLCM eq. 7; tlcm_core/stages/lcd.py: eq. 10).
"""

from __future__ import annotations

import json
from typing import Callable

import torch

from .config import TrainerConfig
from .families import family_of
from .losses import consistency_loss, make_distance
from .lora import ADAPTER, attach_lora, load_lora_into, lora_metadata, lora_state_dict, read_lora, set_lora_forward
from .models import Denoiser, load_schedule, load_unet, resolve_device, teacher_identity
from .pairs import Batch, PairBatches
from .schedule import ddim
from .stage import StageContext
from .training import CheckpointIO, ParamWeights, TrainResult, TrainState, make_optimizer, train

LOSS_PLOT = "loss.png"  # in every training stage's artifact, beside train_log.jsonl
ConsistencyLoss = Callable[[Denoiser, Batch, Callable], torch.Tensor]  # (student, batch, distance) -> scalar


def stage_device(ctx: StageContext) -> torch.device:
    return ctx.accelerator.device if ctx.accelerator is not None else resolve_device(ctx.cfg.compute)


def adapter_weights(unet, adapter: str = ADAPTER) -> ParamWeights:
    """The adapter's trainable tensors by parameter name (what a checkpoint saves and restores)."""
    return ParamWeights({n: p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter}." in n})


def student_unet(ctx: StageContext, device: torch.device, init_input: str | None = None):
    """The teacher's UNet with the student LoRA: zero-initialised (stage 1) or the named input's LoRA (one LoRA
    through all stages)."""
    cfg = ctx.cfg
    unet = load_unet(cfg.teacher, device, torch.float32)
    torch.manual_seed(cfg.compute.seed)  # PEFT draws the LoRA's initial weights from the global RNG
    if init_input is not None:
        init = read_lora(ctx.inputs[init_input], cfg.lora, teacher_identity(cfg.teacher))
        load_lora_into(unet, init.state, cfg.lora)
    else:
        attach_lora(unet, cfg.lora)
    set_lora_forward(unet, cfg.compute.lora_forward)
    if cfg.compute.gradient_checkpointing:
        family_of(unet).enable_gradient_checkpointing(unet)
    unet.train()
    return unet


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


class ConsistencyObjective:
    """One consistency loss over deterministic batches of cached pairs; with an `anchor` (pairs, weight), MLCD's
    loss on those pairs is added to every step with that weight (lcd.mlcd_weight)."""

    def __init__(self, loss_fn: ConsistencyLoss, student: Denoiser, distance, data: PairBatches, device,
                 anchor: tuple[PairBatches, float] | None = None):
        self.loss_fn, self.student, self.distance, self.data, self.device = loss_fn, student, distance, data, device
        self.anchor = anchor

    def batches(self, start: int):
        main = self.data.batches_from(start)
        return main if self.anchor is None else zip(main, self.anchor[0].batches_from(start))

    def loss(self, batch) -> dict[str, torch.Tensor]:
        if self.anchor is None:
            return {"loss": self.loss_fn(self.student, batch.to(self.device), self.distance)}
        own, anchor = batch
        return {"consistency": self.loss_fn(self.student, own.to(self.device), self.distance),
                "mlcd_anchor": self.anchor[1] * mlcd_loss(self.student, anchor.to(self.device), self.distance)}

    def after_step(self, batch, sync) -> dict[str, torch.Tensor]:
        return {}


def train_consistency(ctx: StageContext, tcfg: TrainerConfig, loss_fn: ConsistencyLoss,
                      init_input: str | None = None, anchor_weight: float = 0.0,
                      anchor_batch_size: int | None = None) -> dict:
    """Train the student LoRA on the `pairs` input with `loss_fn` (plus `anchor_weight` x MLCD's loss on batches of
    `anchor_batch_size` (default: the trainer's) of the `anchor` input's pairs); write lora.safetensors and the
    training log."""
    cfg = ctx.cfg
    device = stage_device(ctx)
    schedule = load_schedule(cfg.teacher)
    unet = student_unet(ctx, device, init_input)
    latent_lpips = None
    if tcfg.distance == "latent-lpips":  # from latent_lpips.weights or the latent-lpips stage's artifact
        from .lpips_training import resolve_latent_lpips

        lpips_art = ctx.inputs.get("lpips")
        latent_lpips = resolve_latent_lpips(cfg, ctx.out.store, lpips_art.uri if lpips_art else None, device=device)
    distance = make_distance(tcfg.distance, tcfg.huber_c, latent_lpips)
    data = PairBatches(ctx.inputs["pairs"], tcfg.batch_size, seed=cfg.compute.seed, prefetch=tcfg.prefetch)
    anchor = (PairBatches(ctx.inputs["anchor"], anchor_batch_size or tcfg.batch_size, seed=cfg.compute.seed,
                          prefetch=tcfg.prefetch),
              anchor_weight) if anchor_weight else None
    weights = adapter_weights(unet)
    state = TrainState({"student": weights}, {"student": make_optimizer(weights.parameters(), tcfg)})
    torch.manual_seed(cfg.compute.seed)
    result = train(ConsistencyObjective(loss_fn, Denoiser(unet, schedule), distance, data, device, anchor), state, tcfg,
                   name=ctx.out.stage, ckpt=CheckpointIO(ctx.out), reporter=ctx.reporter, device=device,
                   dtype=cfg.compute.dtype, accelerator=ctx.accelerator)
    return write_trained_lora(ctx, unet, result, tcfg)


def publish_loss(reporter, name: str, log: list[dict], png: bytes | None) -> None:
    """A training stage's loss table and curves, for the run's UI."""
    reporter.table(f"{name}-loss", log, description=f"{name} training loss")
    if png is not None:
        reporter.image(f"{name}-loss-curve", png, description=f"{name} training loss")


def write_trained_lora(ctx: StageContext, unet, result: TrainResult, tcfg: TrainerConfig) -> dict:
    """The end of every training stage: the student's LoRA (with its config and base model in the metadata), the
    training log, the loss table and the loss curves (loss.png, one panel per term); the summary the manifest
    keeps. Only the main process writes."""
    if ctx.accelerator is not None and not ctx.accelerator.is_main_process:
        return {}
    cfg, out, name = ctx.cfg, ctx.out, ctx.out.stage
    out.save_tensors("lora.safetensors", lora_state_dict(unet),
                     metadata=lora_metadata(cfg.lora, teacher_identity(cfg.teacher), family_of(unet)))
    out.write_bytes("train_log.jsonl", "".join(json.dumps(r) + "\n" for r in result.log).encode())
    png = None
    if result.log:
        from .plots import loss_curves_png

        png = loss_curves_png(result.log, title=f"{name}: training loss ({tcfg.iterations} iterations)")
        out.write_bytes(LOSS_PLOT, png)
    if ctx.accelerator is None:  # a data-parallel run publishes from the launching process (tlcm_core/distributed.py)
        publish_loss(ctx.reporter, name, result.log, png)
    last = result.log[-1] if result.log else {}
    return {"iterations": tcfg.iterations, "final_loss": last.get("loss"),
            "final": {k: v for k, v in last.items() if k not in ("step", "lr", "elapsed_s")},
            "resumed_from_step": result.start_step, "steps_per_second": round(result.steps_per_second, 4)}
