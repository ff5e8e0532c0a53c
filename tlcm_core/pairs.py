"""The pair cache: the zarr layout that teacher-trajectories and lcd-trajectories write and MLCD/LCD read.

Layout of a pair artifact (zarr v3 arrays, chunked along the sample axis by `shard_size`):
  cond/{prompt_embeds,pooled,time_ids,text_ids,guidance}  per prompt (P rows), the text conditioning the teacher saw
                                                           (the fields its family fills: tlcm_core/conditioning.py)
  uncond/{...}      one row: the unconditional used for CFG
  x_hi, x_lo        (N, C, h, w)  the noisier latent and its teacher target (eq. 8, or the p-step solver of eq. 9)
  t_hi, t_lo, t_step, prompt_idx  (N,) int32;   seed (N,) int64: the noise seed of each sample
Each shard (one chunk of rows) is computed from its samples' seeds alone and marked done when written, so
shards can run in parallel on several workers and a restart fills only what is missing.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .config import PipelineConfig
from .models import Conditioning, encode_prompts, latent_shape
from .progress import Reporter


SAMPLE_ARRAYS = ("x_hi", "x_lo", "t_hi", "t_lo", "t_step", "prompt_idx", "seed")


def sample_seed(base_seed: int, index: int, domain: str = "teacher") -> int:
    """A stable 63-bit seed per sample (independent of shard size, worker and order); each stage that draws
    samples has its own domain so their randomness never coincides."""
    key = f"tlcm-sample:{base_seed}:{index}" if domain == "teacher" else f"tlcm-{domain}-sample:{base_seed}:{index}"
    h = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def encode_text_arrays(cfg: PipelineConfig, art, pipe, prompts: list[str]) -> None:
    """Encode every prompt once and store the conditioning (idempotent: skipped once marked done)."""
    if art.is_done("text"):
        return
    cond, uncond = encode_prompts(pipe, prompts, cfg.teacher.resolution, batch_size=cfg.trajectories.batch_size,
                                  max_sequence_length=cfg.teacher.max_sequence_length)
    rows = min(len(prompts), 1024)
    for prefix, c in (("cond", cond), ("uncond", uncond)):
        for name, t in c.tensors().items():
            t = t.float().cpu().numpy()
            arr = art.create_array(f"{prefix}/{name}", shape=t.shape, chunks=(min(rows, t.shape[0]),) + t.shape[1:],
                                   dtype="float32")  # no overwrite: concurrent shard runs write identical chunks
            arr[...] = t
    art.mark_done("text", {"num_prompts": len(prompts)})


def read_conditioning(art, prefix: str, rows=None) -> Conditioning:
    out = {}
    for name in Conditioning.field_names():  # a cache written before a field existed simply lacks its array
        if art.exists_file(f"{prefix}/{name}/zarr.json"):
            arr = art.open_array(f"{prefix}/{name}")
            data = arr[...] if rows is None else arr.get_orthogonal_selection((rows,))
            out[name] = torch.from_numpy(np.asarray(data))
    return Conditioning.from_tensors(out)


def create_sample_arrays(art, shape: tuple[int, int, int], num_samples: int, shard_size: int, storage_dtype: str):
    n, s = num_samples, shard_size
    arrays = {name: art.create_array(name, shape=(n, *shape), chunks=(s, *shape), dtype=storage_dtype)
              for name in ("x_hi", "x_lo")}
    for name in ("t_hi", "t_lo", "t_step", "prompt_idx"):
        arrays[name] = art.create_array(name, shape=(n,), chunks=(s,), dtype="int32")
    arrays["seed"] = art.create_array("seed", shape=(n,), chunks=(s,), dtype="int64")
    return arrays


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + shard_size, num_samples)) for i in range(0, num_samples, shard_size)]


ShardFn = Callable[[int, int, tuple[int, int, int]], dict[str, np.ndarray]]  # (start, stop, latent shape) -> arrays


def shard_marker(i: int) -> str:
    """The done marker of shard i: written once its rows are, so a restart or a second worker skips it."""
    return f"shard-{i:05d}"


def fill_pair_shards(cfg: PipelineConfig, art, reporter: Reporter, *, stage: str, num_samples: int,
                     shard_size: int, storage_dtype: str, shards: list[int] | None,
                     setup: Callable[[object, Conditioning, Conditioning], ShardFn],
                     device: torch.device | None = None) -> dict:
    """Shared by every pair-producing stage: text conditioning once, then every missing shard (or only
    `shards`), each written to its chunk-aligned rows and marked done. `setup(pipe, cond, uncond)` returns the
    function that computes one shard; the pipeline is loaded only if some shard is missing."""
    from .models import load_pipeline, resolve_device, resolve_dtype
    from .prompts import check_prompt_lengths, load_prompts

    device = device or resolve_device(cfg.compute)
    prompts = load_prompts(cfg.trajectories.prompts)
    ranges = shard_ranges(num_samples, shard_size)
    todo = [i for i in (shards if shards is not None else range(len(ranges))) if not art.is_done(shard_marker(i))]
    total = len(ranges)
    summary = {"num_samples": num_samples, "num_shards": total, "num_prompts": len(prompts)}
    if not todo and art.is_done("text"):  # every shard is there (e.g. filled by other workers): no model needed
        return {**summary, "latent_shape": list(art.open_array("x_hi").shape[1:])}
    check_prompt_lengths(prompts, cfg.teacher, source=cfg.trajectories.prompts)  # tokenizers only: before the teacher
    pipe = load_pipeline(cfg.teacher, device, resolve_dtype(cfg.compute, device))
    encode_text_arrays(cfg, art, pipe, prompts)
    shape = latent_shape(pipe, cfg.teacher.resolution)
    arrays = create_sample_arrays(art, shape, num_samples, shard_size, storage_dtype)
    compute = setup(pipe, read_conditioning(art, "cond"), read_conditioning(art, "uncond"))
    done = total - len(todo)
    reporter.progress(stage, done, total)
    for i in todo:
        start, stop = ranges[i]
        for name, values in compute(start, stop, shape).items():
            arrays[name][start:stop] = values.astype(arrays[name].dtype)
        art.mark_done(shard_marker(i), {"start": start, "stop": stop})
        done += 1
        reporter.progress(stage, done, total)
    return {**summary, "latent_shape": list(shape)}


BATCH_ARRAYS = ("x_hi", "x_lo", "t_hi", "t_lo", "t_step", "prompt_idx")


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
