"""Stage `evaluate` and `tlcm eval`: few-step student sampling vs the teacher's DDIM + CFG, measured.

Rows have one shape for teacher and student: method, steps, prompt_accuracy, frechet, seconds_per_image,
plus a 95% interval for accuracy. In the toy world the metrics come from the shipped toy evaluator; for
real teachers the field's metrics (CLIP score, aesthetic, ImageReward, FID) plug in here.
"""

from __future__ import annotations

import io
import math
import time

import numpy as np
import torch

from .config import PipelineConfig
from .lora import load_lora_into, merge_lora
from .models import (Denoiser, decode_latents, encode_prompts, latent_shape, load_pipeline, resolve_device,
                     resolve_dtype)
from .progress import Reporter
from .samplers import ddim_sample, student_x0_fn, teacher_x0_fn, tlcm_sample
from .schedule import NoiseSchedule, ddim_timesteps, milestones, sampler_timesteps


def metrics_kind(cfg: PipelineConfig) -> str:
    """toy, real or none: evaluate.metrics.kind with auto resolved (toy in a toy world, else real when captions are
    given). The captions file is read only for the real metrics."""
    m = cfg.evaluate.metrics
    return m.kind if m.kind != "auto" else ("toy" if cfg.teacher.toy_world else "real" if m.captions else "none")


def uses_captions(cfg: PipelineConfig) -> bool:
    return metrics_kind(cfg) == "real" and bool(cfg.evaluate.metrics.captions)


def eval_prompts(cfg: PipelineConfig) -> list[str]:
    """The evaluation prompts: the captions for the real metrics, else the toy world's, else the training prompts."""
    from .prompts import load_prompts

    if uses_captions(cfg):  # e.g. COCO-2017 val captions for the real metrics
        from .metrics import load_captions

        return load_captions(cfg.evaluate.metrics.captions)
    world = cfg.teacher.toy_world
    return load_prompts(f"toy:{world}" if world else cfg.trajectories.prompts)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def eval_noise(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """The same starting noise for every method and step count (so they can be compared sample by sample)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


class Sampler:
    """Teacher DDIM+CFG or student TLCM sampling on a loaded pipeline, in batches, timed."""

    def __init__(self, cfg: PipelineConfig, pipe, lora: dict | None):
        self.cfg, self.pipe = cfg, pipe
        self.schedule = NoiseSchedule.from_config(dict(pipe.scheduler.config))
        self.device = pipe.unet.device
        self.prompts = eval_prompts(cfg)
        self.cond, self.uncond = encode_prompts(pipe, self.prompts, cfg.teacher.resolution)
        self.shape = latent_shape(pipe, cfg.teacher.resolution)
        self.student = lora is not None
        if lora is not None:  # merged: sampling runs the plain UNet (its own pipeline, never the teacher's)
            load_lora_into(pipe.unet, lora, cfg.lora)
            merge_lora(pipe.unet)
        self.denoiser = Denoiser(pipe.unet, self.schedule)

    @torch.no_grad()
    def batches(self, steps: int, n: int, seed: int, batch_size: int, mode: str = "renoise"):
        """Yield (images in [0, 1], their prompts, UNet+VAE seconds) batch by batch, prompts i % P, the same
        starting noise for every method and step count."""
        noise = eval_noise(n, self.shape, seed)
        bounds = milestones(self.schedule.T, self.cfg.schedule.segments)
        dtype = self.pipe.unet.dtype
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            pidx = idx % len(self.prompts)
            cond = self.cond[pidx.to(self.cond.prompt_embeds.device)].to(self.device, dtype)
            x_T = noise[idx].to(self.device, dtype)
            t0 = time.perf_counter()
            if self.student:
                g = torch.Generator().manual_seed(seed * 7 + i)
                x0 = tlcm_sample(student_x0_fn(self.denoiser, cond), x_T, sampler_timesteps(steps, bounds),
                                 self.schedule, mode=mode, generator=g)
            else:
                unc = self.uncond.to(self.device, dtype)
                x0 = ddim_sample(teacher_x0_fn(self.denoiser, cond, unc, self.cfg.schedule.guidance), x_T,
                                 ddim_timesteps(steps, self.schedule.T), self.schedule)
            img = decode_latents(self.pipe, x0)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            yield img.cpu(), [self.prompts[j] for j in pidx.tolist()], time.perf_counter() - t0

    def sample(self, steps: int, n: int, seed: int, batch_size: int, mode: str = "renoise"
               ) -> tuple[torch.Tensor, list[str], float]:
        """All images at once (small n only: evaluate_rows streams batches into the metrics instead)."""
        out = list(self.batches(steps, n, seed, batch_size, mode))
        return (torch.cat([o[0] for o in out]), [p for o in out for p in o[1]], sum(o[2] for o in out) / n)


def grid_png(images: torch.Tensor, prompts: list[str] | None = None, cols: int = 8) -> bytes:
    from PIL import Image

    n = images.shape[0]
    rows = math.ceil(n / cols)
    h, w = images.shape[2], images.shape[3]
    canvas = np.zeros((rows * (h + 2), cols * (w + 2), 3), dtype=np.uint8)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = arr[k]
    img = Image.fromarray(canvas)
    if h < 64:  # toy images are tiny: upscale so a person can see them
        img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ToyMetrics:
    """Prompt accuracy and Frechet distance with the toy world's shipped evaluator."""

    def __init__(self, world: str, n_real: int, seed: int):
        from .toy import ToyEvaluator, get_world

        self.evaluator = ToyEvaluator.load(world)
        real, _ = get_world(world).sample(n_real, seed=seed + 999_983)
        self.real_features = self._features(real)
        self.reset()

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.evaluator.features(images[i:i + 256]) for i in range(0, len(images), 256)])

    def reset(self) -> None:
        self._correct, self._feats, self._attr, self._n = 0, [], {}, 0

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        for i in range(0, len(images), 256):
            im, pr = images[i:i + 256], prompts[i:i + 256]
            hits = self.evaluator.hits(im, pr)
            self._correct += int(self.evaluator.all_right(hits).sum())
            for a, v in hits.items():
                self._attr[a] = self._attr.get(a, 0) + int(v.sum())
            self._feats.append(self.evaluator.features(im))
            self._n += len(im)

    def compute(self) -> dict:
        from .toy import frechet_distance

        k, n = self._correct, self._n
        lo, hi = wilson_interval(k, n)
        return {"prompt_accuracy": round(k / n, 4), "accuracy_ci95": [round(lo, 4), round(hi, 4)],
                "frechet": round(float(frechet_distance(torch.cat(self._feats), self.real_features)), 2),
                **{f"acc_{a}": round(v / n, 4) for a, v in self._attr.items()}}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict:
        self.reset()
        self.update(images, prompts)
        return self.compute()


def metrics_for(cfg: PipelineConfig, device: torch.device):
    """ToyMetrics in a toy world, the field's metrics (tlcm_core.metrics.RealMetrics) for real teachers, or None
    (timing only) -- evaluate.metrics.kind; auto = toy in a toy world, else real when captions are given."""
    m, ev, world, kind = cfg.evaluate.metrics, cfg.evaluate, cfg.teacher.toy_world, metrics_kind(cfg)
    if kind == "toy":
        if not world:
            raise ValueError(f"evaluate.metrics.kind=toy needs a toy teacher, not {cfg.teacher.source!r}")
        return ToyMetrics(world, max(ev.num_samples, 256), ev.seed)
    if kind == "real":
        from .metrics import RealMetrics

        return RealMetrics(m, device)
    return None


def evaluate_rows(cfg: PipelineConfig, lora: dict | None, steps: list[int], reporter: Reporter,
                  include_teacher_steps: list[int] | None = None, grids: dict | None = None) -> list[dict]:
    """Rows for the student (lora given) at `steps`, and for the teacher (DDIM + CFG) at `include_teacher_steps`
    (or at `steps` when lora is None). `grids`, if a dict, receives PNG bytes per row name."""
    ev = cfg.evaluate
    device = resolve_device(cfg.compute)
    pipe = load_pipeline(cfg.teacher, device, resolve_dtype(cfg.compute, device))
    metrics = metrics_for(cfg, device)
    jobs: list[tuple[str, int, dict | None]] = []
    teacher_steps = steps if lora is None else (include_teacher_steps or [])
    jobs += [("teacher-ddim-cfg", s, None) for s in teacher_steps]
    if lora is not None:
        jobs += [(f"tlcm-{ev.sampler}", s, lora) for s in steps]
    rows = []
    samplers: dict[bool, Sampler] = {}
    for method, n_steps, lo in jobs:
        key = lo is not None
        if key not in samplers:
            if key and False in samplers:  # the teacher's pipeline gets the LoRA: load a fresh one for the student
                pipe = load_pipeline(cfg.teacher, device, resolve_dtype(cfg.compute, device))
            samplers[key] = Sampler(cfg, pipe, lo)
        sampler = samplers[key]
        name = f"{method}@{n_steps}"
        if metrics is not None:
            metrics.reset()
        seconds, done, shown = 0.0, 0, []
        for images, prompts, sec in sampler.batches(n_steps, ev.num_samples, ev.seed, ev.batch_size, ev.sampler):
            if metrics is not None:  # streamed: memory stays one batch, whatever num_samples is
                metrics.update(images, prompts)
            if len(shown) < ev.grid_size:
                shown += list(images[:ev.grid_size - len(shown)])
            seconds, done = seconds + sec, done + len(images)
            reporter.progress(f"evaluate {name}", done, ev.num_samples)
        row = {"method": method, "steps": n_steps, "samples": ev.num_samples,
               "seconds_per_image": round(seconds / done, 5)}
        if metrics is not None:
            row.update(metrics.compute())
        rows.append(row)
        if grids is not None and shown:
            grids[name] = grid_png(torch.stack(shown))
    return rows


# TLCM Table 1's columns (method, steps, time per image, FID, CS, AS, IR) when rows carry the real metrics
TABLE1_COLUMNS = {"method": "method", "steps": "steps", "seconds_per_image": "time/img (s)", "fid": "FID",
                  "clip_score": "CS", "aesthetic_score": "AS", "image_reward": "IR"}


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    headers = {}
    if columns is None and any(k in r for r in rows for k in ("fid", "clip_score", "aesthetic_score", "image_reward")):
        columns, headers = list(TABLE1_COLUMNS), TABLE1_COLUMNS
    columns = columns or ["method", "steps", "prompt_accuracy", "accuracy_ci95", "frechet", "seconds_per_image"]
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


