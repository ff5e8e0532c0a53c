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


def launch(cfg: PipelineConfig, stage: str, inputs: dict, out) -> dict:
    """Run training stage `stage` in compute.num_processes processes and return rank 0's summary."""
    n = cfg.compute.num_processes
    with tempfile.TemporaryDirectory(prefix="tlcm-launch-") as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(cfg.model_dump(mode="json"), f)
        cmd = launch_command(n, _free_port()) + ["--config", path, "--stage", stage, "--out", out.uri]
        for key, art in inputs.items():
            cmd += ["--input", f"{key}={art.uri}"]
        r = subprocess.run(cmd, env={**os.environ, "TLCM_DISTRIBUTED_CHILD": "1"})
        if r.returncode != 0:
            raise DistributedTrainingError(
                f"{stage}: data-parallel training ({n} processes) failed with exit code {r.returncode}; see the log "
                f"above. Checkpoints in {out.uri} are kept: a rerun resumes from the latest.")
    return out.read_json(f"_markers/{stage}-train.json")["info"]


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import Accelerator

    from .progress import Reporter
    from .stage import StageContext, config_view
    from .stages import REGISTRY
    from .store import ArtifactStore

    ap = argparse.ArgumentParser()
    for a in ("--config", "--stage", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--input", action="append", default=[], help="NAME=URI of an input artifact (repeatable)")
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = validate_config(json.load(f), source=args.config)
    store = ArtifactStore(cfg.store.url, cfg.store.storage_options or None)
    inputs = {k: store.open_uri(v) for k, v in (item.split("=", 1) for item in args.input)}
    out = store.open_uri(args.out)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    stage = REGISTRY[args.stage]
    summary = stage.run(StageContext(config_view(stage, cfg), inputs, out, Reporter(bars=acc.is_main_process),
                                     accelerator=acc))
    if acc.is_main_process:
        out.mark_done(f"{args.stage}-train", {**summary, "num_processes": acc.num_processes})
    acc.wait_for_everyone()
    acc.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
