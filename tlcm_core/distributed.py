"""Data-parallel training stages under `accelerate launch` (one process per GPU; gloo on a CPU).

The parent (the stage's own process) writes the resolved config to a temp file and launches
`python -m tlcm_core.distributed` in `compute.num_processes` processes; each process builds the same student
from the same artifacts, rank 0 writes checkpoints, the LoRA and the training log, and leaves its summary as a
marker that the parent returns. The parent commits, as for any stage.
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


def launch_training(cfg: PipelineConfig, *, name: str, pairs_art, out_art, loss: str,
                    init_lora_uri: str | None = None, lpips_uri: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="tlcm-launch-") as tmp:
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(cfg.model_dump(mode="json"), f)
        cmd = launch_command(cfg.compute.num_processes, _free_port()) + [
            "--config", path, "--stage", name, "--loss", loss, "--pairs", pairs_art.uri, "--out", out_art.uri]
        if init_lora_uri:
            cmd += ["--init-lora", init_lora_uri]
        if lpips_uri:
            cmd += ["--lpips", lpips_uri]
        r = subprocess.run(cmd, env={**os.environ, "TLCM_DISTRIBUTED_CHILD": "1"})
        if r.returncode != 0:
            raise RuntimeError(f"{name}: distributed training ({cfg.compute.num_processes} processes) failed with "
                               f"exit code {r.returncode}; see the log above. Checkpoints in {out_art.uri} are kept: "
                               "a rerun resumes from the latest.")
    return out_art.read_json(f"_markers/{name}-train.json")["info"]


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import Accelerator

    from .consistency import train_consistency_stage
    from .progress import Reporter
    from .store import ArtifactStore

    ap = argparse.ArgumentParser()
    for a in ("--config", "--stage", "--loss", "--pairs", "--out"):
        ap.add_argument(a, required=True)
    ap.add_argument("--init-lora", default=None)
    ap.add_argument("--lpips", default=None)
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = validate_config(json.load(f), source=args.config)
    store = ArtifactStore(cfg.store.url, cfg.store.storage_options or None)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    tcfg = getattr(cfg, args.stage.replace("-", "_"))
    summary = train_consistency_stage(cfg, tcfg, name=args.stage, pairs_art=store.open_uri(args.pairs),
                                      out_art=store.open_uri(args.out), loss=args.loss,
                                      reporter=Reporter(bars=acc.is_main_process), init_lora_uri=args.init_lora,
                                      lpips_uri=args.lpips, accelerator=acc)
    if acc.is_main_process:
        summary["num_processes"] = acc.num_processes
        store.open_uri(args.out).mark_done(f"{args.stage}-train", summary)
    acc.wait_for_everyone()
    acc.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
