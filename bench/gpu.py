"""GPU benchmark at SDXL scale, with random weights (no download): an SDXL-sized UNet built from its config,
bf16, 128x128 latents (1024 px). Measures teacher CFG throughput for trajectory generation and the MLCD step
time (LoRA rank 64 on the official modules), with SDPA and torch.compile on/off, peak memory, and projects the
GPU hours of the paper's schedule. One prepared run, a few minutes on an H100/A100.

    python bench/gpu.py [--batch 8] [--samples 200000] [--quick]
Without a CUDA device it says so and exits 0 (CI never runs it); `--tiny` runs the same code on the CPU with a
toy-sized UNet to check the script itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], flip_sin_to_cos=True,
    freq_shift=0, in_channels=4, layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn", norm_num_groups=32,
    out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True)


def build(tiny: bool, device, dtype):
    from diffusers import UNet2DConditionModel

    if tiny:
        from tlcm_core.toy.pipeline import unet_config

        cfg, ctx, pooled, size = unet_config(), 64, 32, 16
    else:
        cfg, ctx, pooled, size = SDXL_UNET, 2048, 1280, 128
    unet = UNet2DConditionModel(**cfg).to(device, dtype).eval().requires_grad_(False)
    return unet, ctx, pooled, size


def timeit(fn, n: int, device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=200_000, help="trajectory samples to project")
    ap.add_argument("--iterations", type=int, default=12_000, help="MLCD iterations to project (paper: 12k)")
    ap.add_argument("--gpus", type=int, default=4, help="GPUs the paper's per-GPU batch is spread over")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--tiny", action="store_true", help="a toy-sized UNet on the CPU (checks the script)")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("bench/gpu.py: no CUDA device here; nothing measured (run it on a GPU machine, or --tiny to check "
              "the script on the CPU)")
        return 0
    from common import report
    from tlcm_core.config import LoRAConfig
    from tlcm_core.lora import attach_lora, lora_parameters
    from tlcm_core.models import Conditioning, Denoiser
    from tlcm_core.schedule import NoiseSchedule, ddim

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = 3 if args.quick or args.tiny else 10
    sch = NoiseSchedule.from_config({"beta_schedule": "scaled_linear"})
    unet, ctx, pooled, size = build(args.tiny, device, dtype)
    params = sum(p.numel() for p in unet.parameters())
    B = args.batch
    cond = Conditioning(torch.randn(B, 77, ctx, device=device, dtype=dtype),
                        torch.randn(B, pooled, device=device, dtype=dtype),
                        torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * B, device=device, dtype=dtype))
    uncond = cond[:1]
    x = torch.randn(B, 4, size, size, device=device, dtype=dtype)
    t = torch.randint(1, 999, (B,), device=device)
    rows = []
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    M = 8
    mean_L = sum(M - s for s in range(M)) / M
    for sdpa in (True, False):
        unet.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
        for compiled in (False, True):
            if compiled and (device.type != "cuda" or not sdpa):
                continue
            model = torch.compile(unet) if compiled else unet
            teacher = Denoiser(model, sch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                cfg_s = timeit(lambda: teacher.guided(x, t, cond, uncond, 8.0), reps, device)
            traj_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            per_sample = cfg_s / B * (mean_L + 1)  # MDS steps + the jump, each one CFG evaluation
            rows.append({"work": "teacher CFG eval (trajectories)", "SDPA": sdpa, "compile": compiled,
                         "s/iter": cfg_s, "samples/s": 1 / per_sample, "peak GiB": traj_mem,
                         "projected GPU-h": args.samples * per_sample / 3600})
    # MLCD step: LoRA rank 64 on the official target modules, bf16 autocast, AdamW on the LoRA
    unet.set_attn_processor(AttnProcessor2_0())
    rank = 4 if args.tiny else 64
    attach_lora(unet, LoRAConfig(rank=rank, alpha=8))
    unet.train()
    lora = lora_parameters(unet)
    for p in lora:
        p.data = p.data.float()
    opt = torch.optim.AdamW(lora, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    for compiled in ((False, True) if device.type == "cuda" else (False,)):
        model = torch.compile(unet) if compiled else unet
        student = Denoiser(model, sch)
        t_lo = (t - 20).clamp(min=0)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                x0, _ = student(x, t, cond)
                pred = ddim(sch, x, x0, t, t_lo)
                with torch.no_grad():
                    x0l, _ = student(x, t_lo, cond)
                loss = (pred.float() - x0l.float()).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        s = timeit(step, reps, device)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append({"work": f"MLCD step (batch {B}, LoRA r{rank})", "SDPA": True, "compile": compiled, "s/iter": s,
                     "samples/s": B / s, "peak GiB": mem,
                     "projected GPU-h": args.iterations * s * max(1, 16 * args.gpus // B) / 3600})
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (--tiny)"
    kind = "toy-sized UNet, float32 (script check only)" if args.tiny else "SDXL-sized UNet, bf16"
    report(f"GPU: {kind} ({params / 1e6:.0f} M params), {size}x{size} latents — {name}", rows,
           notes=f"Trajectories: {args.samples} samples at {mean_L + 1:.1f} CFG evaluations each (MDS, M = 8). MLCD: "
                 f"{args.iterations} iterations at the paper's global batch (16 per GPU x {args.gpus} GPUs) from "
                 f"batch-{B} step times. The paper reports 70 A100-hours for all stages.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
