"""Data-parallel training stages under `accelerate launch` (one process per GPU; gloo on a CPU).

Launched at the stage boundary (tlcm_core.pipeline.execute) for any stage declared `trains=True`: the parent
writes the resolved config to a temp file and starts `python -m tlcm_core.distributed` in compute.num_processes
processes. Each process runs the stage's own `run` with an accelerator in its context (tlcm_core/training.py
averages gradients across them); rank 0 writes checkpoints, the LoRA and the log, and leaves its summary as a
marker that the parent returns. The parent commits, as for any stage. No stage code is entered twice.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid

from .config import PipelineConfig, validate_config
from .errors import UserError


class DistributedTrainingError(UserError, RuntimeError):
    """The data-parallel processes failed; their log is above and the checkpoints are kept."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(n: int, port: int) -> list[str]:
    # --multi_gpu with N processes is a real N-process DDP run; on a machine without GPUs accelerate uses gloo
    # (its --cpu flag would silently run a single process).
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "tlcm_core.distributed"]


def cpu_processes(compute) -> int:
    """compute.cpu_processes when the stages run on a CPU, else 1 (a GPU's work is not shared among local
    processes; several GPUs are compute.num_processes or the deployment's shard runs)."""
    if compute.cpu_processes < 2:
        return 1
    from .models import resolve_device

    return compute.cpu_processes if resolve_device(compute).type == "cpu" else 1


def world_size(compute, splits_on_cpu: bool = True) -> int:
    """The data-parallel processes of a training stage: compute.num_processes; or, for a stage that `splits_on_cpu`
    (MLCD, LCD) training on a CPU with that at 1, compute.cpu_processes (each with 1/N of every batch)."""
    if compute.num_processes > 1:
        return compute.num_processes
    return cpu_processes(compute) if splits_on_cpu else 1


def child_args(tmp: str, cfg: PipelineConfig, stage: str, out, inputs: dict) -> list[str]:
    """A stage's child process's arguments (`parse_child_args` reads them): `cfg` as JSON in the directory `tmp`,
    the stage, and the URIs of its output and input artifacts."""
    path = os.path.join(tmp, "config.json")
    with open(path, "w") as f:
        json.dump(cfg.model_dump(mode="json"), f)
    args = ["--config", path, "--stage", stage, "--out", out.uri]
    for key, art in inputs.items():
        args += ["--input", f"{key}={art.uri}"]
    return args


def cores_shared(env: dict, n: int) -> dict:
    """`env` for one of n processes sharing this machine's cores: 1/n of them as its threads, so that together
    they do not oversubscribe the CPU."""
    return {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or n) // n))}


def parse_child_args(ap: argparse.ArgumentParser, argv: list[str] | None):
    """Parse `child_args` (plus `ap`'s own options) and open them: (args, config, output artifact, inputs)."""
    from .store import ArtifactStore

    for a in ("--config", "--stage", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--input", action="append", default=[], help="NAME=URI of an input artifact (repeatable)")
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = validate_config(json.load(f), source=args.config)
    store = ArtifactStore(cfg.store.url, cfg.store.storage_options or None)
    inputs = {k: store.open_uri(v) for k, v in (item.split("=", 1) for item in args.input)}
    return args, cfg, store.open_uri(args.out), inputs


def split_batches(cfg: PipelineConfig, n: int) -> PipelineConfig:
    """The config each of n processes trains with when compute.cpu_processes splits MLCD's or LCD's batches: their
    batch sizes divided by n, and n as the data-parallel world. Rank r takes micro-batches r, r + n, ... of the
    smaller size, which together are the one-process batches (tlcm_core/pairs.py: a batch's rows do not depend on
    the batch size), so the recipe is the same."""
    data = cfg.model_dump(mode="json")
    data["compute"].update(num_processes=n, cpu_processes=1)
    for field, size in cfg.trainer_batch_sizes().items():
        section, key = field.split(".")
        data[section][key] = size // n
    return validate_config(data, source="compute.cpu_processes")


PROGRESS = "_markers/{stage}-progress.json"  # rank 0's latest progress, for the launching process to forward
POLL_S = 2.0


def _progress_reporter(out, stage: str, main: bool, launch_id: str):
    """Rank 0 reports progress into the artifact's bookkeeping (never committed), where `launch` reads it and
    forwards it to the run's reporter (the terminal's bar, the Prefect UI's progress); the other ranks stay quiet.
    `launch_id` tells this launch's file from one an interrupted launch left behind."""
    from .progress import Reporter, SilentReporter

    class ProgressFile(Reporter):
        def progress(self, key: str, done: int, total: int, **metrics: float) -> None:
            out.write_json(PROGRESS.format(stage=stage), {"launch": launch_id, "key": key, "done": done,
                                                          "total": total, "metrics": metrics})

    return ProgressFile(bars=False) if main else SilentReporter()


def _forward_progress(out, stage: str, reporter, last: dict | None, launch_id: str) -> dict | None:
    """The processes' latest progress, passed to `reporter` when it changed (a file caught mid-write, or one an
    earlier launch left, is skipped)."""
    try:
        now = out.read_json(PROGRESS.format(stage=stage))
    except Exception:  # not written yet, or being written
        return last
    if now.get("launch") != launch_id:
        return last
    if now != last:
        reporter.progress(now["key"], now["done"], now["total"], **now["metrics"])
    return now


def _run_forwarding(cmd: list[str], env: dict, out, stage: str, reporter, launch_id: str) -> int:
    """Run the launcher, forwarding progress every POLL_S; the processes are killed if this one is interrupted."""
    proc = subprocess.Popen(cmd, env=env)
    last = None
    try:
        while True:
            try:
                rc = proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                rc = None
            if reporter is not None:
                last = _forward_progress(out, stage, reporter, last, launch_id)
            if rc is not None:
                return rc
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def launch(cfg: PipelineConfig, stage: str, inputs: dict, out, n: int, reporter=None) -> dict:
    """Run training stage `stage` in n processes (`world_size`) and return rank 0's summary; forward its progress
    and publish its loss table and curves through `reporter`."""
    child = cfg if cfg.compute.num_processes > 1 else split_batches(cfg, n)
    with tempfile.TemporaryDirectory(prefix="tlcm-launch-") as tmp:
        launch_id = uuid.uuid4().hex
        cmd = launch_command(n, _free_port()) + child_args(tmp, child, stage, out, inputs) + ["--launch-id", launch_id]
        env = {**os.environ, "TLCM_DISTRIBUTED_CHILD": "1"}
        if child is not cfg:  # a CPU's cores shared out
            env = cores_shared(env, n)
        rc = _run_forwarding(cmd, env, out, stage, reporter, launch_id)
        if rc != 0:
            raise DistributedTrainingError(
                f"{stage}: data-parallel training ({n} processes) failed with exit code {rc}; see the log "
                f"above. Checkpoints in {out.uri} are kept: a rerun resumes from the latest.")
    if reporter is not None:
        from .consistency import LOSS_PLOT, publish_loss

        log = [json.loads(line) for line in out.read_bytes("train_log.jsonl").decode().splitlines()]
        publish_loss(reporter, stage, log, out.read_bytes(LOSS_PLOT) if log else None)
    return out.read_json(f"_markers/{stage}-train.json")["info"]


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import Accelerator

    from .models import resolve_device
    from .stage import StageContext, config_view
    from .stages import REGISTRY

    ap = argparse.ArgumentParser(description="one process of a data-parallel training stage")
    ap.add_argument("--launch-id", default="", help="tags rank 0's progress file for the launching process")
    args, cfg, out, inputs = parse_child_args(ap, argv)
    acc = Accelerator(cpu=resolve_device(cfg.compute).type == "cpu")
    stage = REGISTRY[args.stage]
    reporter = _progress_reporter(out, args.stage, acc.is_main_process, args.launch_id)
    summary = stage.run(StageContext(config_view(stage, cfg), inputs, out, reporter, accelerator=acc))
    if acc.is_main_process:
        out.mark_done(f"{args.stage}-train", {**summary, "num_processes": acc.num_processes})
    acc.wait_for_everyone()
    acc.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
