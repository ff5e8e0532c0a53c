"""Multi-process (data-parallel) MLCD through accelerate: 2 processes over gloo on this CPU prove the code path."""

import json

import torch

from tlcm_core.config import load_config
from tlcm_core.pipeline import open_store, run_pipeline
from tlcm_core.progress import SilentReporter


def test_mlcd_two_processes(tmp_path):
    from tlcm_core.toy.pipeline import build_toy_pipeline

    teacher = tmp_path / "tiny"
    build_toy_pipeline(seed=3).save_pretrained(teacher)
    cfg = load_config("toy-fast", [
        f"teacher.source={teacher}", f"store.url={tmp_path / 'store'}", "trajectories.num_samples=32",
        "trajectories.shard_size=16", "mlcd.iterations=4", "mlcd.batch_size=4", "mlcd.checkpoint_every=2",
        "mlcd.log_every=2", "lora.rank=4", "compute.num_processes=2", "compute.device=cpu"])
    traj, mlcd = run_pipeline(cfg, stages=["teacher-trajectories", "mlcd"], reporter=SilentReporter())
    assert mlcd.summary["num_processes"] == 2 and not mlcd.cached
    art = open_store(cfg).artifact("mlcd", mlcd.fingerprint)
    m = art.manifest(verify="checksum")
    assert "lora.safetensors" in m.files and not any(f.startswith(("_markers", "checkpoints")) for f in m.files)
    lora = art.load_tensors("lora.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())  # it learned (B starts at zero)
    log = [json.loads(x) for x in art.read_bytes("train_log.jsonl").decode().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
