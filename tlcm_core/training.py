"""The one training loop, shared by every training stage (MLCD, LCD, finetune).

A stage supplies an `Objective` (its math: the loss terms of one micro-batch, and optional updates of auxiliary
models after the student's step) and a `TrainState` (named weights and named optimisers); `train` runs the
steps, logs, checkpoints and resumes. Checkpointing is its own object, `CheckpointIO` (EDM2's pattern): it saves
whatever has `state_dict`/`load_state_dict` and restores the latest complete checkpoint.

The data order is a pure function of (seed, micro-batch index), so a resumed run sees exactly the batches an
uninterrupted run would have seen. With an accelerator (several processes), rank r takes micro-batches
r, r + world, ... of that order, gradients are averaged across ranks before each optimiser step, and only rank 0
writes.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch

from .config import TrainerConfig
from .progress import Reporter

Terms = dict[str, torch.Tensor]  # named, already weighted loss terms; the student's loss is their sum


class Objective(Protocol):
    """A training stage's math. `batches(k)` yields micro-batches from global index k on; `loss` returns the
    weighted terms whose sum the student minimises; `after_step` (optional work, e.g. a fake score model's or a
    discriminator's update) runs after the student's optimiser step and returns terms to log."""

    def batches(self, start: int) -> Iterator[Any]: ...

    def loss(self, batch: Any) -> Terms: ...

    def after_step(self, batch: Any, sync: GradSync) -> Terms: ...


class ParamWeights:
    """A named set of parameters (a LoRA adapter, say) with the state_dict interface checkpoints use."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().to("cpu").contiguous() for k, p in self.params.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.params):
            raise KeyError(f"checkpoint has {len(state)} tensors, the model {len(self.params)}; keys differ")
        for k, p in self.params.items():
            p.copy_(state[k])


class EmaWeights:
    """An exponential moving average of parameters, checkpointed with them. After the optimiser's n-th step
    (n = 0, 1, ...) the average moves towards the parameters by 1 - d with d = min(decay, (1 + n) / (10 + n)): the
    smaller early decay keeps the starting weights from dominating a short training. `copy_to_params` puts the
    average into the parameters (what a stage then saves)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = ParamWeights({k: p.detach().clone() for k, p in params.items()})  # what checkpoints hold

    @torch.no_grad()
    def update(self, n: int) -> None:
        d = min(self.decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(self.shadow.parameters(), [p.detach() for p in self.params.values()], 1.0 - d)

    def copy_to_params(self) -> None:
        ParamWeights(self.params).load_state_dict(self.shadow.params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow.load_state_dict(state)


@dataclass
class TrainState:
    """Everything a training run saves and restores. `weights["student"]` and `optimizers["student"]` are the
    student's; other entries (a fake score adapter, discriminator heads) belong to the objective."""

    weights: dict[str, Any]  # name -> object with state_dict()/load_state_dict() of tensors
    optimizers: dict[str, torch.optim.Optimizer]
    step: int = 0
    log: list[dict] = field(default_factory=list)


class CheckpointIO:
    """TrainState checkpoints under {artifact}/{prefix}/step-N/ (prefix `checkpoints`; a run of several trainings
    in one artifact, such as finetune's phases, gives each its own) and resume from the latest.

    Weights go to safetensors, optimiser states, step, RNG and log to a weights_only-safe torch file. Each
    checkpoint is written in full (with its files' sha256) before `latest.json` points at it, so a kill mid-write
    leaves the previous checkpoint in charge; older checkpoints beyond `keep` are removed after the pointer moves.
    """

    def __init__(self, art, keep: int = 2, prefix: str = "checkpoints"):
        self.art, self.keep, self.prefix = art, keep, prefix.rstrip("/")

    def save(self, state: TrainState) -> None:
        from safetensors.torch import save as save_safetensors

        d = f"{self.prefix}/step-{state.step:08d}"
        tensors = {f"{name}.{k}": v.detach().to("cpu").contiguous()
                   for name, w in state.weights.items() for k, v in w.state_dict().items()}
        blob = save_safetensors(tensors)
        buf = io.BytesIO()
        torch.save({"optimizers": {k: o.state_dict() for k, o in state.optimizers.items()}, "step": state.step,
                    "rng": torch.get_rng_state(), "log": json.dumps(state.log)}, buf)
        sums = {}
        for name, data in (("weights.safetensors", blob), ("state.pt", buf.getvalue())):
            self.art.write_bytes(f"{d}/{name}", data)
            sums[name] = hashlib.sha256(data).hexdigest()  # checked on resume
        self.art.write_json(f"{self.prefix}/latest.json", {"step": state.step, "dir": d, "sha256": sums})
        self._prune()

    def _prune(self) -> None:
        fs, root = self.art.fs, self.art.path(self.prefix)
        try:
            dirs = sorted(p for p in fs.ls(root, detail=False) if p.rstrip("/").split("/")[-1].startswith("step-"))
        except FileNotFoundError:
            return
        for p in dirs[:-self.keep]:
            fs.rm(p, recursive=True)

    def latest(self) -> dict | None:
        if not self.art.exists_file(f"{self.prefix}/latest.json"):
            return None
        return self.art.read_json(f"{self.prefix}/latest.json")

    @property
    def _restart(self) -> str:
        what = "stage" if self.prefix == "checkpoints" else "training"
        return f"Delete {self.art.uri}/{self.prefix} to restart this {what} from step 0"

    def _verified(self, info: dict, name: str) -> bytes:
        """A checkpoint file's bytes, checked against the sha256 that latest.json recorded for it."""
        from .store import CorruptArtifactError

        data = self.art.read_bytes(f"{info['dir']}/{name}")
        want = (info.get("sha256") or {}).get(name)
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise CorruptArtifactError(
                f"artifact {self.art.uri}: checkpoint file {info['dir']}/{name} fails its sha256 check (truncated "
                f"or altered); it will not be used. {self._restart}, or the artifact folder to recompute it.")
        return data

    def load_latest(self, state: TrainState) -> bool:
        """Restore `state` (and the torch RNG) from the latest checkpoint; False if there is none."""
        from safetensors.torch import load as load_safetensors

        from .store import CorruptArtifactError

        info = self.latest()
        if info is None:
            return False
        tensors = load_safetensors(self._verified(info, "weights.safetensors"))
        try:
            saved = torch.load(io.BytesIO(self._verified(info, "state.pt")), weights_only=True)
        except CorruptArtifactError:
            raise
        except Exception as e:  # noqa: BLE001 - the unpickler's refusal or a damaged file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CorruptArtifactError(
                f"artifact {self.art.uri}: checkpoint file {info['dir']}/state.pt is not a plain tensor checkpoint "
                f"(torch.load(weights_only=True) refused it: {first}); it is never unpickled. {self._restart}."
            ) from None
        for name, w in state.weights.items():
            w.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        for name, opt in state.optimizers.items():
            opt.load_state_dict(saved["optimizers"][name])
        torch.set_rng_state(saved["rng"])
        state.step, state.log = int(saved["step"]), json.loads(saved["log"])
        return True


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainerConfig) -> torch.optim.Optimizer:
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {}))


def autocast_for(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return nullcontext()


class GradSync:
    """Averages gradients across data-parallel processes (a no-op in one process). The loop syncs the student's;
    an objective syncs its auxiliary models' before their optimiser steps."""

    BUCKET_ELEMENTS = 25_000_000  # 100 MB of float32 gradients in flight at a time

    def __init__(self, accelerator=None):
        self.world = accelerator.num_processes if accelerator is not None else 1

    def __call__(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        # gradients flattened into buckets of up to BUCKET_ELEMENTS, one all-reduce each, as DDP does: a call per
        # parameter costs a round trip each (258 for toy-hard's LoRA), which on gloo took a third of a step
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        sizes: dict[tuple, int] = {}
        for p in params:
            if p.grad is None:
                continue
            key = (p.grad.dtype, p.grad.device)
            groups = buckets.setdefault(key, [[]])
            if groups[-1] and sizes[key] + p.grad.numel() > self.BUCKET_ELEMENTS:
                groups.append([])
                sizes[key] = 0
            groups[-1].append(p.grad)
            sizes[key] = sizes.get(key, 0) + p.grad.numel()
        for grads in (b for groups in buckets.values() for b in groups):
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat /= self.world
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
            value /= self.world
        return value


@dataclass
class TrainResult:
    log: list[dict]
    start_step: int
    steps_per_second: float


class _LogWindow:
    """Loss terms summed on the device between log rows: one host sync per log interval, not per step."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, terms: Terms, scale: float = 1.0) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach() * scale

    def row(self, step: int, lr: float, t0: float, sync: GradSync) -> dict:
        values = {k: float(sync.mean(v / self.steps)) for k, v in self.sums.items()}
        self.sums, self.steps = {}, 0
        return {"step": step, **values, "lr": lr, "elapsed_s": round(time.perf_counter() - t0, 3)}


def train(objective: Objective, state: TrainState, tcfg: TrainerConfig, *, name: str, ckpt: CheckpointIO,
          reporter: Reporter, device: torch.device, dtype: str = "float32", accelerator=None,
          save_final: bool = False) -> TrainResult:
    """AdamW steps of the student with gradient accumulation, clipping, warmup, logging and resumable checkpoints.
    A log row holds `loss` (the student's total) and, when there are several, each term. `save_final` also
    checkpoints the last step: a training that others follow in one artifact (a finetune phase) leaves its end
    state, so a resume restores it instead of training it again. With `ema_decay` the student's weights at the end
    are the average of its steps' weights (`EmaWeights`, checkpointed as `student_ema`)."""
    sync = GradSync(accelerator)
    world, rank = sync.world, (accelerator.process_index if accelerator is not None else 0)
    opt = state.optimizers["student"]
    params = [p for g in opt.param_groups for p in g["params"]]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / tcfg.warmup) if tcfg.warmup else 1.0)
    ema = EmaWeights(state.weights["student"].params, tcfg.ema_decay) if tcfg.ema_decay else None
    if ema is not None:
        state.weights["student_ema"] = ema  # before the resume, which restores it with the rest
    if ckpt.load_latest(state):
        sched.last_epoch = state.step  # as after `step` scheduler steps; the lr itself came with the optimiser
        reporter.log(f"{name}: resuming from checkpoint step {state.step}")
    start, t0, window = state.step, time.perf_counter(), _LogWindow()
    source = objective.batches(start * tcfg.grad_accum * world + rank)
    micro = itertools.islice(source, 0, None, world)
    if rank == 0:
        reporter.progress(name, start, tcfg.iterations)  # the bar starts at the resumed step, rates stay true
    while state.step < tcfg.iterations:
        # 1) the student's gradient over grad_accum micro-batches (and over the ranks)
        for _ in range(tcfg.grad_accum):
            batch = next(micro)
            with autocast_for(device, dtype):
                terms = objective.loss(batch)
                loss = sum(terms.values()) / tcfg.grad_accum
            loss.backward()
            window.add({"loss": loss.detach() * tcfg.grad_accum, **(terms if len(terms) > 1 else {})},
                       1.0 / tcfg.grad_accum)
        sync(params)
        # 2) its optimiser step (clipped, warmed up)
        if tcfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(state.step)
        # 3) whatever the objective updates after the student (fake score model, discriminator)
        window.add(objective.after_step(batch, sync))
        state.step += 1
        window.steps += 1
        # 4) bookkeeping: a log row, a progress update, a checkpoint
        if state.step % tcfg.log_every == 0 or state.step == tcfg.iterations:
            state.log.append(window.row(state.step, sched.get_last_lr()[0], t0, sync))
            if rank == 0:
                reporter.progress(name, state.step, tcfg.iterations,
                                  **{k: v for k, v in state.log[-1].items() if k not in ("step", "lr", "elapsed_s")})
        if state.step % tcfg.checkpoint_every == 0 and state.step < tcfg.iterations or \
                save_final and state.step == tcfg.iterations:
            if rank == 0:
                ckpt.save(state)
            if accelerator is not None:
                accelerator.wait_for_everyone()
    if hasattr(source, "close"):
        source.close()  # stops a prefetch thread now, not whenever the generator is collected
    if ema is not None:
        ema.copy_to_params()
    elapsed = time.perf_counter() - t0
    rate = (state.step - start) / elapsed if elapsed > 0 and state.step > start else 0.0
    return TrainResult(state.log, start, rate)
