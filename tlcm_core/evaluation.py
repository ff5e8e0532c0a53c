"""Stage `evaluate` and `tlcm eval`: few-step student sampling vs the teacher's own baseline sampler, measured.

Rows have one shape for teacher and student: method, steps, prompt_accuracy, frechet, seconds_per_image,
plus a 95% interval for accuracy. The teacher's rows are `teacher-ddim-cfg` (DDIM + CFG on trailing timesteps, an
SD/SDXL teacher) or `teacher-euler` (a flow teacher's Euler on its own shifted sigma grid with the guidance its
stock pipeline applies: FLUX.1-dev's embedding, SD3's CFG). In the toy world the metrics come from the shipped toy
evaluator; for real teachers the field's metrics (CLIP score, aesthetic, ImageReward, HPSv2, PickScore, FID) plug
in here.
Other methods' few-step LoRAs (ForeignLoRA) are sampled with the stock diffusers scheduler each ships
(SchedulerSampler), in the same protocol: same prompts, starting noise, seeds and metrics (docs/metrics.md).

In the pipeline the teacher's rows are sampled once per teacher and protocol by stage teacher-evaluate
(`teacher_rows`, kept as `TeacherRows`: rows, grids, the side-by-side's teacher images, FID's reference statistics)
and merged into the student's by stage evaluate (`evaluate_rows(teacher=...)`), which then samples only the LoRA;
`tlcm eval` (no store) samples both in process. Both give the same numbers.
"""

from __future__ import annotations

import io
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .config import LoRAConfig, PipelineConfig
from .lora import LoRAError, load_lora_into, merge_lora
from .models import (Conditioning, Denoiser, decode_latents, encode_prompts, family_of, images_uint8, latent_shape,
                     load_pipeline, network_of, resolve_device, resolve_dtype, schedule_of, teacher_grid)
from .plots import TEACHER_METHODS, is_teacher
from .progress import Reporter
from .samplers import student_x0_fn, teacher_sample, tlcm_sample
from .schedule import milestones, sampler_timesteps


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


# the teacher's jobs in eval_jobs; its rows are named by the sampler (Sampler.teacher_method)
TEACHER_JOB = "teacher"


class Sampler:
    """The teacher's baseline (DDIM + CFG, or a flow teacher's Euler on its own grid) or the student's TLCM
    sampling on a loaded pipeline, in batches, timed."""

    def __init__(self, cfg: PipelineConfig, pipe, lora: dict | None):
        self.cfg, self.pipe = cfg, pipe
        self.schedule = schedule_of(pipe, cfg.teacher.resolution)
        net = network_of(pipe)
        self.device = net.device
        self.prompts = eval_prompts(cfg)
        self.cond, self.uncond = encode_prompts(pipe, self.prompts, cfg.teacher.resolution,
                                                max_sequence_length=cfg.teacher.max_sequence_length)
        self.shape = latent_shape(pipe, cfg.teacher.resolution)
        self.student = lora is not None
        if lora is not None:  # merged: sampling runs the plain network (its own pipeline, never the teacher's)
            load_lora_into(net, lora, cfg.lora)
            merge_lora(net)
        self.denoiser = Denoiser(net, self.schedule)
        # the teacher's rows: DDIM + CFG on trailing timesteps (DDPM time), or Euler on its stock sigma grid (flow)
        self.teacher_method = "teacher-ddim-cfg" if family_of(pipe).name == "unet" else "teacher-euler"

    @torch.no_grad()
    def batches(self, steps: int, n: int, seed: int, batch_size: int, mode: str = "renoise"):
        """Yield (images in [0, 1], their prompts, UNet+VAE seconds) batch by batch, prompts i % P, the same
        starting noise for every method and step count."""
        noise = eval_noise(n, self.shape, seed)
        # the student's milestones (the teacher's DDIM has none: stage teacher-evaluate does not read schedule.segments)
        timesteps = self.milestones(steps) if self.student else None
        dtype = network_of(self.pipe).dtype
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n))
            pidx = idx % len(self.prompts)
            cond = self.cond[pidx.to(self.cond.prompt_embeds.device)].to(self.device, dtype)
            x_T = noise[idx].to(self.device, dtype)
            t0 = time.perf_counter()
            x0 = self.latents(steps, x_T, cond, torch.Generator().manual_seed(seed * 7 + i), mode, timesteps)
            img = decode_latents(self.pipe, x0)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            yield img.cpu(), [self.prompts[j] for j in pidx.tolist()], time.perf_counter() - t0

    def latents(self, steps: int, x_T: torch.Tensor, cond, generator: torch.Generator, mode: str = "renoise",
                timesteps: list[int] | None = None) -> torch.Tensor:
        """x0 latents from x_T: the student's TLCM sampler (on `timesteps`, default `milestones(steps)`), or the
        teacher's own baseline (samplers.teacher_sample: DDIM + CFG on trailing timesteps, or a flow teacher's Euler on
        its stock pipeline's shifted sigma grid)."""
        if self.student:
            ts = timesteps if timesteps is not None else self.milestones(steps)
            return tlcm_sample(student_x0_fn(self.denoiser, cond), x_T, ts, self.schedule, mode=mode,
                               generator=generator)
        unc = self.uncond.to(self.device, x_T.dtype)
        return teacher_sample(self.denoiser, x_T, steps, cond, unc, teacher_guidance(self.cfg),
                              teacher_grid(self.pipe, self.cfg.teacher.resolution, steps))

    def milestones(self, steps: int) -> list[int]:
        """The milestone timesteps the student's `steps`-step sampler visits (evaluate.milestone_grid)."""
        bounds = milestones(self.schedule.T, self.cfg.schedule.segments)
        return sampler_timesteps(steps, bounds, self.cfg.evaluate.milestone_grid, self.schedule)

    def sample(self, steps: int, n: int, seed: int, batch_size: int, mode: str = "renoise"
               ) -> tuple[torch.Tensor, list[str], float]:
        """All images at once (small n only: evaluate_rows streams batches into the metrics instead)."""
        out = list(self.batches(steps, n, seed, batch_size, mode))
        return (torch.cat([o[0] for o in out]), [p for o in out for p in o[1]], sum(o[2] for o in out) / n)


# ---------------------------------------------------------------------------------------------------------------------
# Other methods' few-step LoRAs (LCM-LoRA, TCD, PCM, Hyper-SD, DMD2, SDXL-Lightning): the stock scheduler each ships


# `tlcm eval --scheduler` names -> how their LoRAs are sampled in their model cards
STOCK_SCHEDULERS = {"lcm": "LCMScheduler (LCM-LoRA, DMD2 LoRA)", "tcd": "TCDScheduler, eta 0.3 (TCD, PCM)",
                    "euler-trailing": "EulerDiscreteScheduler, trailing timesteps (SDXL-Lightning)",
                    "ddim-trailing": "DDIMScheduler, trailing timesteps (Hyper-SD)"}
FOREIGN_ADAPTER = "foreign"


@dataclass(eq=False)
class ForeignLoRA:
    """A LoRA evaluated with a stock diffusers scheduler instead of the TLCM sampler, in the same protocol (prompts,
    starting noise, seeds, metrics). `tlcm` is set for one of our LoRAs (loaded with its alpha and merged, as the
    student's rows); any other file goes through diffusers' `load_lora_weights` (diffusers or kohya keys) and is fused.
    guidance > 1 adds CFG (on the UNet output, as diffusers pipelines); distilled LoRAs run without (0 or 1)."""

    state: dict[str, torch.Tensor]
    url: str
    scheduler: str
    guidance: float = 1.0
    tlcm: LoRAConfig | None = None

    @property
    def method(self) -> str:
        cfg = f"-cfg{self.guidance:g}" if self.guidance > 1 else ""
        return f"{'tlcm' if self.tlcm is not None else 'lora'}-{self.scheduler}{cfg}"


def stock_scheduler(name: str, base_config):
    """The scheduler a method's model card sets, built from the teacher's scheduler config as those cards do
    (`XScheduler.from_config(pipe.scheduler.config, ...)`)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

    if name == "lcm":
        return LCMScheduler.from_config(base_config)
    if name == "tcd":
        return TCDScheduler.from_config(base_config)
    if name == "euler-trailing":
        return EulerDiscreteScheduler.from_config(base_config, timestep_spacing="trailing")
    if name == "ddim-trailing":  # SDXL's shipped config says clip_sample=false; DDIM's class default would clip latents
        return DDIMScheduler.from_config(base_config, timestep_spacing="trailing", clip_sample=False)
    raise ValueError(f"unknown stock scheduler {name!r}; one of {', '.join(STOCK_SCHEDULERS)}")


def scheduler_sample(unet, scheduler, x_T: torch.Tensor, steps: int, cond, uncond, guidance: float,
                     generator: torch.Generator) -> torch.Tensor:
    """x0 latents by a stock diffusers scheduler, the loop its pipelines run: x_T x init_noise_sigma, then per timestep
    scale_model_input -> UNet (CFG on its output when guidance > 1) -> scheduler.step (its noise from `generator`)."""
    from .schedule import cfg as cfg_mix

    scheduler.set_timesteps(steps, device=x_T.device)
    x, n = x_T * scheduler.init_noise_sigma, x_T.shape[0]
    both = Conditioning.cat([uncond.expand(n), cond]) if guidance > 1 else cond
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x_in = torch.cat([x_in, x_in]) if guidance > 1 else x_in
        out = unet(x_in, t.expand(x_in.shape[0]), **both.unet_kwargs(), return_dict=False)[0]
        out = cfg_mix(out[:n], out[n:], guidance) if guidance > 1 else out
        x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
    return x


@contextmanager
def _quiet_diffusers():
    """diffusers logs every LoRA load (no text-encoder keys, a failed load) to stderr; load_foreign_lora says what
    matters in one LoRAError line instead."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def load_foreign_lora(pipe, lora: ForeignLoRA) -> None:
    """Load `lora` into the pipeline and fold it into the weights; one LoRAError line when it does not fit."""
    if lora.tlcm is not None:
        load_lora_into(pipe.unet, lora.state, lora.tlcm)
        merge_lora(pipe.unet)
        return
    with _quiet_diffusers():
        try:
            converted, _ = pipe.lora_state_dict(dict(lora.state), unet_config=pipe.unet.config)
            pipe.load_lora_weights(dict(lora.state), adapter_name=FOREIGN_ADAPTER)
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
            detail = " ".join(str(e).split())
            raise LoRAError(f"{lora.url}: does not fit the teacher's UNet ({detail[:300]})") from None
        # diffusers only warns about LoRA keys that match no layer: count what was attached
        wanted = sum(1 for k in converted if k.endswith((".lora_A.weight", ".lora.down.weight", ".lora_B.weight",
                                                         ".lora.up.weight")))
        parts = [m for m in (pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
                 if m is not None]
        got = sum(1 for m in parts for k, _ in m.named_parameters()
                  if f".{FOREIGN_ADAPTER}." in k and (".lora_A." in k or ".lora_B." in k))
        if got == 0 or got < wanted:
            what = (f"{wanted - got} of its {wanted} LoRA tensors match no layer of" if wanted > got
                    else "none of its tensors loads into")
            raise LoRAError(f"{lora.url}: {what} the teacher's UNet or text encoders (a LoRA for another base "
                            "model?)")
        pipe.fuse_lora(adapter_names=[FOREIGN_ADAPTER])


class SchedulerSampler(Sampler):
    """A LoRA sampled the way its method ships it (ForeignLoRA): a stock diffusers scheduler on the LoRA's UNet, with
    the same prompts and starting noise as every other row."""

    def __init__(self, cfg: PipelineConfig, pipe, lora: ForeignLoRA):
        load_foreign_lora(pipe, lora)  # before the prompts are encoded: a kohya file may adapt the text encoders too
        super().__init__(cfg, pipe, None)
        self.lora, self.scheduler = lora, stock_scheduler(lora.scheduler, pipe.scheduler.config)

    def latents(self, steps: int, x_T: torch.Tensor, cond, generator: torch.Generator, mode: str = "renoise",
                timesteps: list[int] | None = None) -> torch.Tensor:
        unc = self.uncond.to(self.device, x_T.dtype)
        return scheduler_sample(self.pipe.unet, self.scheduler, x_T, steps, cond, unc, self.lora.guidance, generator)


def make_sampler(cfg: PipelineConfig, pipe, lora: dict | ForeignLoRA | None) -> Sampler:
    return SchedulerSampler(cfg, pipe, lora) if isinstance(lora, ForeignLoRA) else Sampler(cfg, pipe, lora)


def _lora_bytes(ref: str) -> tuple[bytes, str]:
    from .lora import _read

    root = ref.rstrip("/")
    candidates = [ref] if ref.endswith(".safetensors") else [
        f"{root}/lora.safetensors", f"{root}/diffusers/pytorch_lora_weights.safetensors",
        f"{root}/pytorch_lora_weights.safetensors"]
    for url in candidates:
        raw = _read(url)
        if raw is not None:
            return raw, url
    raise LoRAError(f"no TLCM LoRA or diffusers/kohya LoRA file at {ref} (looked for {', '.join(candidates)})")


def eval_lora(ref: str, cfg: PipelineConfig, fmt: str = "auto", scheduler: str | None = None,
              guidance: float | None = None) -> dict | ForeignLoRA:
    """What `tlcm eval --lora REF` evaluates: a TLCM LoRA's state (the TLCM sampler), or a ForeignLoRA (a stock
    scheduler). fmt auto: tlcm when the file has tlcm-lora/1 metadata, else diffusers (diffusers or kohya keys).
    Refused (LoRAError, before the teacher loads): unreadable, a TLCM LoRA of another rank or base model, a
    non-TLCM LoRA without --scheduler, a TLCM file with alpha != rank through diffusers' loader (it drops alpha)."""
    from safetensors.torch import load

    from .lora import check_lora, read_lora
    from .models import teacher_identity

    raw, url = _lora_bytes(ref)
    try:
        state, header = load(raw), json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    except Exception as e:
        raise LoRAError(f"{url} is not a readable safetensors file ({e})") from None
    metadata = dict(header.get("__metadata__") or {})
    is_tlcm = metadata.get("format") == "tlcm-lora/1"
    fmt = ("tlcm" if is_tlcm else "diffusers") if fmt == "auto" else fmt
    if scheduler not in (None, "tlcm", *STOCK_SCHEDULERS):
        raise LoRAError(f"--scheduler {scheduler}: one of tlcm, {', '.join(STOCK_SCHEDULERS)}")
    if fmt == "tlcm":
        lf = read_lora(url, cfg.lora, teacher_identity(cfg.teacher))
        if scheduler in (None, "tlcm"):
            if guidance is not None:
                raise LoRAError(f"--guidance {guidance:g}: the TLCM sampler has no CFG (the guidance scale is "
                                "distilled into the LoRA); --guidance goes with a stock --scheduler")
            return lf.state
        return ForeignLoRA(lf.state, lf.url, scheduler, 1.0 if guidance is None else guidance, tlcm=lf.config)
    if scheduler in (None, "tlcm"):
        raise LoRAError(f"{url} is not a TLCM LoRA (no tlcm-lora/1 metadata): say which scheduler its method samples "
                        "it with, --scheduler " + "; ".join(f"{k} = {v}" for k, v in STOCK_SCHEDULERS.items()))
    if is_tlcm:
        saved = check_lora(state, metadata, where=url)
        if saved.alpha != saved.rank:
            raise LoRAError(f"{url}: a TLCM LoRA with alpha {saved.alpha:g} != rank {saved.rank}, which diffusers' "
                            "loader would drop; use --lora-format tlcm (or auto), or its exported diffusers file")
    return ForeignLoRA(state, url, scheduler, 1.0 if guidance is None else guidance)


def grid_png(images: torch.Tensor, prompts: list[str] | None = None, cols: int = 8) -> bytes:
    from PIL import Image

    n = images.shape[0]
    rows = math.ceil(n / cols)
    h, w = images.shape[2], images.shape[3]
    canvas = np.zeros((rows * (h + 2), cols * (w + 2), 3), dtype=np.uint8)
    arr = images_uint8(images)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = arr[k]
    img = Image.fromarray(canvas)
    if h < 64:  # toy images are tiny: upscale so a person can see them
        img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def side_by_side_names(names: list[str], student_steps: tuple[int, ...] = (2, 4)) -> list[str]:
    """The rows a side-by-side shows: the teacher at its most steps (the quality reference), then the student at
    `student_steps` (else at its two fewest steps). Names are `method@steps` (evaluate_rows)."""
    parsed = [(n, n.rsplit("@", 1)[0], int(n.rsplit("@", 1)[1])) for n in names]
    teacher = [p for p in parsed if is_teacher(p[1])]
    student = sorted((p for p in parsed if not is_teacher(p[1])), key=lambda p: p[2])
    picked = [p for p in student if p[2] in student_steps] or student[:2]
    return ([max(teacher, key=lambda p: p[2])[0]] if teacher else []) + [p[0] for p in picked]


def side_by_side_png(samples: dict[str, tuple[torch.Tensor, list[str]]], cols: int = 8, cell: int | None = None,
                     label_width: int = 150) -> bytes | None:
    """One compact image: a row per method (side_by_side_names), a column per sample; every column is the same
    prompt from the same starting noise, headed by its prompt. None when there is nothing to compare."""
    from PIL import Image, ImageDraw, ImageFont

    names = side_by_side_names(list(samples))
    if len(names) < 2:
        return None
    n = min(cols, *(len(samples[k][0]) for k in names))
    h, w = samples[names[0]][0].shape[2:]
    cell = cell or (128 if h <= 64 else 192)  # the height of a tile: toy images go up 4x, SDXL's down
    size = (max(1, round(cell * w / h)), cell)
    head, pad = 34, 4
    canvas = Image.new("RGB", (label_width + n * (size[0] + pad), head + len(names) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    for c, prompt in enumerate(samples[names[0]][1][:n]):
        lines = ["", ""]  # the prompt on two lines as wide as a cell, cut with an ellipsis
        for word in prompt.split():
            k = 0 if draw.textlength(f"{lines[0]} {word}", font=font) <= size[0] and not lines[1] else 1
            lines[k] = f"{lines[k]} {word}".strip()
        if draw.textlength(lines[1], font=font) > size[0]:
            while len(lines[1]) > 1 and draw.textlength(lines[1] + "…", font=font) > size[0]:
                lines[1] = lines[1][:-1]
            lines[1] += "…"
        draw.multiline_text((label_width + c * (size[0] + pad), 2), "\n".join(lines), fill="black", font=font)
    for r, name in enumerate(names):
        y = head + r * (cell + pad)
        method, steps = name.rsplit("@", 1)
        who = TEACHER_METHODS[method] if is_teacher(method) else f"student {method}"
        draw.multiline_text((6, y + cell // 2 - 16), f"{who}\n{steps} steps", fill="black", font=font, spacing=4)
        arr = images_uint8(samples[name][0][:n])
        for c in range(n):
            resample = Image.NEAREST if arr.shape[1] < cell else Image.LANCZOS  # tiny toy pixels stay crisp
            canvas.paste(Image.fromarray(arr[c]).resize(size, resample), (label_width + c * (size[0] + pad), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
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


def fid_teacher_steps(cfg: PipelineConfig) -> int | None:
    """The teacher row whose samples are FID's reference set (evaluate.metrics.fid_reference=teacher), else None."""
    m = cfg.evaluate.metrics
    real_fid = metrics_kind(cfg) == "real" and "fid" in m.run
    return m.fid_teacher_steps if real_fid and m.fid_reference == "teacher" else None


def eval_jobs(cfg: PipelineConfig, lora: dict | ForeignLoRA | None, steps: list[int],
              include_teacher_steps: list[int] | None = None) -> list[tuple[str, int, dict | ForeignLoRA | None]]:
    """(method, steps, lora) per row, in sampling order: the teacher's rows, then the LoRA's. The FID reference row
    (fid_teacher_steps) comes first, sampled once, also when it is not asked for as a row."""
    teacher_steps = list(steps if lora is None else (include_teacher_steps or []))
    ref = fid_teacher_steps(cfg)
    if ref is not None:
        teacher_steps = [ref] + [s for s in teacher_steps if s != ref]
    jobs: list[tuple[str, int, dict | ForeignLoRA | None]] = [(TEACHER_JOB, s, None) for s in teacher_steps]
    if lora is not None:
        method = lora.method if isinstance(lora, ForeignLoRA) else f"tlcm-{cfg.evaluate.sampler}"
        jobs += [(method, s, lora) for s in steps]
    return jobs


def teacher_guidance(cfg: PipelineConfig) -> float:
    """The CFG scale of the teacher's baseline rows: evaluate.teacher_guidance, else the distillation's scale."""
    g = cfg.evaluate.teacher_guidance
    return cfg.schedule.guidance if g is None else g


def teacher_guidance_reads(cfg: PipelineConfig) -> tuple[str, ...]:
    """The config fields teacher_guidance reads (schedule.guidance only when evaluate.teacher_guidance is unset)."""
    return ("evaluate.teacher_guidance",) + (("schedule.guidance",) if cfg.evaluate.teacher_guidance is None else ())


def teacher_row_steps(cfg: PipelineConfig, with_lora: bool) -> list[int]:
    """The teacher's rows of the evaluate stage, in sampling order (stage teacher-evaluate samples them): the FID
    reference row first (fid_teacher_steps), then evaluate.teacher_steps, or evaluate.steps when there is no LoRA
    (the teacher alone). Empty: the evaluate stage needs nothing of the teacher."""
    ev = cfg.evaluate
    return [s for _, s, _ in eval_jobs(cfg, None, ev.teacher_steps if with_lora else ev.steps)]


@dataclass
class TeacherRows:
    """The teacher's rows of an evaluation, sampled once (stage teacher-evaluate) and merged into the student's
    (evaluate_rows(teacher=...)): the rows, their grids (PNG by row name), the images and prompts of the row a
    side-by-side shows (the teacher at its most steps), and FID's reference statistics when the teacher's samples
    are FID's reference (fid_reference=teacher)."""

    rows: list[dict]
    grids: dict[str, bytes]
    shown: dict[str, tuple[torch.Tensor, list[str]]]
    fid_reference: dict[str, torch.Tensor] | None = None


TEACHER_SHOWN = "side_by_side.safetensors"  # the side-by-side's teacher images, uint8 as the grid draws them
FID_REFERENCE = "fid_reference.safetensors"  # FID's reference statistics (torchmetrics' real_features_*)


def grid_file(name: str) -> str:
    """An artifact's grid of row `method@steps`."""
    return f"grids/{name.replace('@', '-')}.png"


def teacher_rows(cfg: PipelineConfig, steps: list[int], reporter: Reporter) -> TeacherRows:
    """Sample and measure the teacher (its baseline sampler) at `steps`, in eval_jobs' order (the FID reference row
    first), exactly as evaluate_rows does for its teacher rows."""
    grids: dict[str, bytes] = {}
    samples: dict = {}
    rows, metrics = _sample_rows(cfg, eval_jobs(cfg, None, steps), reporter, grids, samples)
    keep = side_by_side_names(list(samples))[:1]  # the teacher at its most steps: all a side-by-side shows of it
    ref = metrics.reference_state() if metrics is not None and fid_teacher_steps(cfg) is not None else None
    return TeacherRows(rows, grids, {k: samples[k] for k in keep}, ref)


def save_teacher_rows(art, t: TeacherRows) -> None:
    """Into an artifact: metrics.json and metrics.md, grids/*.png, TEACHER_SHOWN, FID_REFERENCE."""
    art.write_json("metrics.json", t.rows)
    art.write_bytes("metrics.md", (markdown_table(t.rows) + "\n").encode())
    for name, png in t.grids.items():
        art.write_bytes(grid_file(name), png)
    for name, (images, prompts) in t.shown.items():
        # the very conversion side_by_side_png applies: reloaded as u8 / 255, the grid draws the same pixels
        u8 = torch.from_numpy(images_uint8(images)).permute(0, 3, 1, 2).contiguous()
        art.save_tensors(TEACHER_SHOWN, {"images": u8}, {"row": name, "prompts": json.dumps(prompts)})
    if t.fid_reference is not None:
        art.save_tensors(FID_REFERENCE, t.fid_reference)


def load_teacher_rows(art) -> TeacherRows:
    """What save_teacher_rows wrote (grids in row order)."""
    rows = art.read_json("metrics.json")
    names = [f"{r['method']}@{r['steps']}" for r in rows]
    grids = {n: art.read_bytes(grid_file(n)) for n in names if art.exists_file(grid_file(n))}
    shown = {}
    if art.exists_file(TEACHER_SHOWN):
        meta = art.tensors_metadata(TEACHER_SHOWN)
        shown[meta["row"]] = (art.load_tensors(TEACHER_SHOWN)["images"].float() / 255, json.loads(meta["prompts"]))
    return TeacherRows(rows, grids, shown, art.load_tensors(FID_REFERENCE) if art.exists_file(FID_REFERENCE) else None)


def evaluate_rows(cfg: PipelineConfig, lora: dict | ForeignLoRA | None, steps: list[int], reporter: Reporter,
                  include_teacher_steps: list[int] | None = None, grids: dict | None = None,
                  samples: dict | None = None, teacher: TeacherRows | None = None) -> list[dict]:
    """Rows for the student (lora given) at `steps`, and for the teacher (its baseline) at `include_teacher_steps`
    (or at `steps` when lora is None). `grids`, if a dict, receives PNG bytes per row name; `samples`, if a dict,
    the grid's images and prompts per row name (the same prompts and starting noise in every row). A ForeignLoRA is
    sampled with its stock scheduler (SchedulerSampler). With fid_reference=teacher the teacher's samples at
    fid_teacher_steps are FID's reference (eval_jobs samples them first).

    `teacher`: the teacher's rows sampled before (teacher_rows; stage teacher-evaluate). Then the teacher is not
    sampled: its rows, grids and side-by-side images come first, as if sampled here, and FID's reference is its
    stored statistics; only the LoRA's rows are sampled."""
    jobs = eval_jobs(cfg, lora, steps, include_teacher_steps)
    if teacher is None:
        return _sample_rows(cfg, jobs, reporter, grids, samples)[0]
    if grids is not None:
        grids.update(teacher.grids)
    if samples is not None:
        samples.update(teacher.shown)
    rows, _ = _sample_rows(cfg, [j for j in jobs if j[2] is not None], reporter, grids, samples,
                           teacher.fid_reference)
    return [*teacher.rows, *rows]


def _sample_rows(cfg: PipelineConfig, jobs: list[tuple[str, int, dict | ForeignLoRA | None]], reporter: Reporter,
                 grids: dict | None, samples: dict | None,
                 fid_reference: dict | None = None) -> tuple[list[dict], object]:
    """Sample and measure `jobs` (eval_jobs) row by row: (rows, the metrics object). Nothing loads when there is
    nothing to sample; `fid_reference` restores FID's reference statistics (the teacher's, sampled before)."""
    if not jobs:
        return [], None
    device = resolve_device(cfg.compute)
    pipe = load_pipeline(cfg.teacher, device, resolve_dtype(cfg.compute, device))
    metrics = metrics_for(cfg, device)
    if fid_reference is not None:
        metrics.load_reference_state(fid_reference)
    ref_steps = fid_teacher_steps(cfg)
    rows = []
    samplers: dict[bool, Sampler] = {}
    for method, n_steps, lo in jobs:
        key = lo is not None
        if key not in samplers:
            if key and False in samplers:  # the teacher's pipeline gets the LoRA: load a fresh one for the student
                pipe = load_pipeline(cfg.teacher, device, resolve_dtype(cfg.compute, device))
            samplers[key] = make_sampler(cfg, pipe, lo)
        method = samplers[key].teacher_method if method == TEACHER_JOB else method
        row, shown, shown_prompts = _sample_row(cfg, samplers[key], method, n_steps, key, metrics, reporter,
                                                reference=not key and n_steps == ref_steps)
        name = f"{method}@{n_steps}"
        rows.append(row)
        if grids is not None and shown:
            grids[name] = grid_png(torch.stack(shown))
        if samples is not None and shown:
            samples[name] = (torch.stack(shown), shown_prompts)
    return rows, metrics


def _sample_row(cfg: PipelineConfig, sampler: Sampler, method: str, n_steps: int, student: bool, metrics,
                reporter: Reporter, reference: bool) -> tuple[dict, list[torch.Tensor], list[str]]:
    """One row: its metrics streamed batch by batch, the first grid_size images and their prompts. `reference`:
    these are the teacher's samples FID measures against (fid_reference=teacher)."""
    ev, name = cfg.evaluate, f"{method}@{n_steps}"
    mode = ev.sampler if student else "renoise"  # the student's sampler; the teacher's baseline has no mode
    if metrics is not None:
        metrics.reset()
    seconds, done, shown, shown_prompts = 0.0, 0, [], []
    for images, prompts, sec in sampler.batches(n_steps, ev.num_samples, ev.seed, ev.batch_size, mode):
        if metrics is not None:  # streamed: memory stays one batch, whatever num_samples is
            metrics.update(images, prompts)
            if reference:  # the teacher's samples: FID's reference set, reused
                metrics.update_reference(images)
        if len(shown) < ev.grid_size:
            shown_prompts += prompts[:ev.grid_size - len(shown)]
            shown += list(images[:ev.grid_size - len(shown)])
        seconds, done = seconds + sec, done + len(images)
        reporter.progress(f"evaluate {name}", done, ev.num_samples)
    row = {"method": method, "steps": n_steps, "samples": ev.num_samples, "seconds_per_image": round(seconds / done, 5)}
    if student and not isinstance(sampler, SchedulerSampler):  # the TLCM sampler: where it evaluated the LoRA
        row["timesteps"] = sampler.milestones(n_steps)
    if metrics is not None:
        row.update(metrics.compute())
    return row, shown, shown_prompts


# TLCM Table 1's columns (method, steps, time per image, FID, CS, AS, IR) when rows carry the real metrics
TABLE1_COLUMNS = {"method": "method", "steps": "steps", "seconds_per_image": "time/img (s)", "fid": "FID",
                  "fid_teacher": "FID (teacher)", "clip_score": "CS", "aesthetic_score": "AS", "image_reward": "IR",
                  "hpsv2": "HPSv2", "pickscore": "PickScore"}


def round_sig(value, digits: int = 4):
    """Floats to `digits` significant digits (inside lists and dicts too), for tables a person reads; the JSON
    artifacts keep full precision."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return round(value, digits - 1 - math.floor(math.log10(abs(value))))
    if isinstance(value, (list, tuple)):
        return [round_sig(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: round_sig(v, digits) for k, v in value.items()}
    return value


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    headers = {}
    metrics = [k for k in TABLE1_COLUMNS if k not in ("method", "steps", "seconds_per_image")]
    if columns is None and any(k in r for r in rows for k in metrics):  # the field's metrics: Table 1's columns
        columns, headers = list(TABLE1_COLUMNS), TABLE1_COLUMNS
    columns = columns or ["method", "steps", "prompt_accuracy", "accuracy_ci95", "frechet", "seconds_per_image"]
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


