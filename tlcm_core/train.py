"""The consistency trainer shared by MLCD (stage 1) and LCD (stage 2): data, checkpoints, the loop.

The data order is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would have seen; batches are read from zarr a group of shards at a time by a prefetch
thread, off the critical path.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .config import TrainerConfig
from .models import Conditioning
from .progress import Reporter

BATCH_ARRAYS = ("x_hi", "x_lo", "t_hi", "t_lo", "t_step", "prompt_idx")


# ---------------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Batch:
    x_hi: torch.Tensor
    x_lo: torch.Tensor
    t_hi: torch.Tensor
    t_lo: torch.Tensor
    t_step: torch.Tensor
    cond: Conditioning

    def to(self, device, dtype=None) -> Batch:
        return Batch(self.x_hi.to(device, dtype), self.x_lo.to(device, dtype), self.t_hi.to(device),
                     self.t_lo.to(device), self.t_step.to(device), self.cond.to(device, dtype))


class PairBatches:
    """Deterministic random batches of cached (x_hi, x_lo) pairs from a trajectory artifact.

    An epoch is a seeded permutation of the shards, taken `group` shards at a time; each group yields
    floor(group_rows / batch_size) batches from a seeded permutation of its rows. `batches_from(step)` starts
    anywhere, so resuming needs no loader state.
    """

    def __init__(self, art, batch_size: int, seed: int, group: int = 4, prefetch: int = 2):
        self.art, self.batch_size, self.seed, self.prefetch = art, batch_size, seed, prefetch
        self.arrays = {name: art.open_array(name) for name in BATCH_ARRAYS}
        n = self.arrays["x_hi"].shape[0]
        shard = self.arrays["x_hi"].chunks[0]
        self.shards = [(i, min(i + shard, n)) for i in range(0, n, shard)]
        self.group = max(1, min(group, len(self.shards)))
        if n < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {n} cached samples in {art.uri}")
        from .trajectories import read_conditioning

        # per-prompt conditioning is small next to the latents: keep it in memory
        self.cond = read_conditioning(art, "cond")

    def _groups(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.shards), generator=g).tolist()
        return [order[i:i + self.group] for i in range(0, len(order), self.group)]

    def _group_batches(self, shards: list[int]) -> int:
        rows = sum(self.shards[s][1] - self.shards[s][0] for s in shards)
        return rows // self.batch_size

    def _load_group(self, epoch: int, gi: int, shards: list[int]) -> list[Batch]:
        parts = {name: [] for name in BATCH_ARRAYS}
        for s in shards:
            a, b = self.shards[s]
            for name in BATCH_ARRAYS:
                parts[name].append(np.asarray(self.arrays[name][a:b]))
        data = {k: torch.from_numpy(np.concatenate(v)) for k, v in parts.items()}
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 7919 + gi)
        perm = torch.randperm(len(data["t_hi"]), generator=g)
        out = []
        for i in range(self._group_batches(shards)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            out.append(Batch(data["x_hi"][idx].float(), data["x_lo"][idx].float(), data["t_hi"][idx].long(),
                             data["t_lo"][idx].long(), data["t_step"][idx].long(),
                             self.cond[data["prompt_idx"][idx].long()]))
        return out

    def _schedule(self, start_step: int) -> Iterator[tuple[int, int, list[int], int]]:
        """(epoch, group index, shards, first batch within group) from the step to start at."""
        step, epoch = 0, 0
        while True:
            for gi, shards in enumerate(self._groups(epoch)):
                nb = self._group_batches(shards)
                if step + nb > start_step:
                    yield epoch, gi, shards, max(0, start_step - step)
                step += nb
            epoch += 1

    def batches_from(self, start_step: int) -> Iterator[Batch]:
        """Infinite iterator of batches beginning at global batch index `start_step`, prefetched in a thread."""
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():  # never block for good: the consumer may be gone
                try:
                    q.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    pass
            return False

        def producer():
            try:
                for epoch, gi, shards, skip in self._schedule(start_step):
                    if not put(self._load_group(epoch, gi, shards)[skip:]):
                        return
            except BaseException as e:  # surface loader errors in the training thread
                put(e)

        if self.prefetch == 0:
            for epoch, gi, shards, skip in self._schedule(start_step):
                yield from self._load_group(epoch, gi, shards)[skip:]
            return
        th = threading.Thread(target=producer, daemon=True)
        th.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:  # the consumer closed the iterator (or dropped it): let the thread finish
            stop.set()
            th.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


class Checkpointer:
    """Trainable tensors + optimizer states + step + RNG + log under {artifact}/checkpoints/; resume from the
    latest.

    Each checkpoint is written in full before `latest.json` points at it, so a kill mid-write leaves the
    previous checkpoint in charge. Older checkpoints beyond `keep` are removed after the pointer moves.
    """

    def __init__(self, art, keep: int = 2):
        self.art, self.keep = art, keep

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """`tensors` go to safetensors; `state` (optimizer state dicts, a log list, ...) to a weights_only-safe
        torch file, with the step and the torch RNG state added."""
        d = f"checkpoints/step-{step:08d}"
        from safetensors.torch import save as save_safetensors

        blob = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        self.art.write_bytes(f"{d}/lora.safetensors", blob)
        sums = {"lora.safetensors": hashlib.sha256(blob).hexdigest()}  # checked on resume
        buf = io.BytesIO()
        torch.save({**{k: v for k, v in state.items() if k != "log"}, "step": step, "rng": torch.get_rng_state(),
                    "log": json.dumps(state.get("log", []))}, buf)
        self.art.write_bytes(f"{d}/state.pt", buf.getvalue())
        sums["state.pt"] = hashlib.sha256(buf.getvalue()).hexdigest()
        self.art.write_json("checkpoints/latest.json", {"step": step, "dir": d, "sha256": sums})
        self._prune(step)

    def _prune(self, step: int) -> None:
        fs = self.art.fs
        root = self.art.path("checkpoints")
        try:
            dirs = sorted(p for p in fs.ls(root, detail=False) if p.rstrip("/").split("/")[-1].startswith("step-"))
        except FileNotFoundError:
            return
        for p in dirs[:-self.keep]:
            fs.rm(p, recursive=True)

    def latest(self) -> dict | None:
        if not self.art.exists_file("checkpoints/latest.json"):
            return None
        return self.art.read_json("checkpoints/latest.json")

    def _verified(self, info: dict, name: str) -> bytes:
        """A checkpoint file's bytes, checked against the sha256 that latest.json recorded for it."""
        data = self.art.read_bytes(f"{info['dir']}/{name}")
        want = (info.get("sha256") or {}).get(name)
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            from .store import CorruptArtifactError

            raise CorruptArtifactError(
                f"artifact {self.art.uri}: checkpoint file {info['dir']}/{name} fails its sha256 check (truncated "
                f"or altered); it will not be used. Delete {self.art.uri}/checkpoints to restart this stage "
                "from step 0, or the artifact folder to recompute it.")
        return data

    def load(self, info: dict) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors.torch import load as load_safetensors

        lora = load_safetensors(self._verified(info, "lora.safetensors"))
        try:
            state = torch.load(io.BytesIO(self._verified(info, "state.pt")), weights_only=True)
        except Exception as e:  # noqa: BLE001 - the unpickler's refusal or a damaged file
            from .store import CorruptArtifactError

            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CorruptArtifactError(
                f"artifact {self.art.uri}: checkpoint file {info['dir']}/state.pt is not a plain tensor checkpoint "
                f"(torch.load(weights_only=True) refused it: {first}); it is never unpickled. Delete "
                f"{self.art.uri}/checkpoints to restart this stage from step 0.") from None
        state["log"] = json.loads(state["log"])
        return lora, state


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainerConfig) -> torch.optim.Optimizer:
    fused = bool(params) and params[0].is_cuda
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {}))


def autocast_for(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype in ("bfloat16", "float16"):
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return nullcontext()


@dataclass
class TrainResult:
    lora: dict[str, torch.Tensor]
    log: list[dict]
    start_step: int
    steps_per_second: float


def train_loop(cfg: TrainerConfig, *, name: str, model: torch.nn.Module, params: list[torch.nn.Parameter],
               loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor], batches: Callable[[int], Iterator[Batch]],
               get_lora: Callable[[], dict[str, torch.Tensor]], set_lora: Callable[[dict[str, torch.Tensor]], None],
               ckpt: Checkpointer, reporter: Reporter, device: torch.device, dtype: str = "float32",
               accelerator=None) -> TrainResult:
    """AdamW over `params` with gradient accumulation, clipping, warmup, logging and resumable checkpoints.

    `batches(k)` must yield the k-th micro-batch onwards; `loss_fn(model, batch)` returns a scalar loss.
    With an `accelerator` (several processes), `model` is wrapped for data parallelism, process r takes
    micro-batches r, r + world, ... of the same deterministic order, and only the main process writes.
    """
    world, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    main = rank == 0
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) if cfg.warmup else 1.0)
    step, log = 0, []
    info = ckpt.latest()
    if info is not None:  # resume from the latest checkpoint
        lora, state = ckpt.load(info)
        set_lora(lora)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, log = int(state["step"]), state["log"]
        sched.last_epoch = step  # as after `step` scheduler steps (construction made step 0); lr came with opt
        reporter.log(f"{name}: resuming from checkpoint step {step}")
    start = step
    if accelerator is not None:
        model, opt = accelerator.prepare(model, opt)
    source = batches(step * cfg.grad_accum * world + rank)
    it = itertools.islice(source, 0, None, world)
    t0, window = time.perf_counter(), []
    if main:
        reporter.progress(name, step, cfg.iterations)  # the bar starts at the resumed step, rates stay true
    while step < cfg.iterations:
        for _ in range(cfg.grad_accum):
            batch = next(it).to(device)
            with autocast_for(device, dtype):
                loss = loss_fn(model, batch) / cfg.grad_accum
            accelerator.backward(loss) if accelerator is not None else loss.backward()
            window.append(loss.detach())
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # grads are already all-reduced
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.iterations:
            # one host sync per log interval, not per step
            value = torch.stack(window).sum() / (len(window) / cfg.grad_accum)
            if accelerator is not None:
                value = accelerator.reduce(value, reduction="mean")
            value, window = float(value), []
            log.append({"step": step, "loss": value, "lr": sched.get_last_lr()[0],
                        "elapsed_s": round(time.perf_counter() - t0, 3)})
            if main:
                reporter.progress(name, step, cfg.iterations, loss=value)
        if step % cfg.checkpoint_every == 0 and step < cfg.iterations:
            if main:
                ckpt.save(step, get_lora(), {"optimizer": opt.state_dict(), "log": log})
            if accelerator is not None:
                accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - t0
    if hasattr(source, "close"):
        source.close()  # stops the prefetch thread now, not whenever the generator is collected
    return TrainResult(get_lora(), log, start, (step - start) / elapsed if elapsed > 0 and step > start else 0.0)
