"""compute.lora_forward on a CPU: MLCD on toy-hard's pairs with PEFT's LoRA forward ("separate") against one op on
the adapted weight ("merged"), in one process with one thread and in the preset's two processes; the stage's wall
time, its training steps per second, and how far each LoRA is from the one-process separate one (the same function and
batches: only float rounding should differ).
The first run samples the teacher's pairs into DIR (about a minute); later runs reuse them.
`--layers` instead times single LoRA layers of the toy UNet's and SDXL's shapes (forward and backward, one thread)
and counts the bytes each mode keeps for the backward pass beyond the parameters: where the rank is far below the
width, merged pays for the adapted weight's full-size gradient and copy without saving much.

    python bench/bench_lora_forward.py [--iterations 40] [--rank 64] [--samples 1024] [--work-dir DIR]
    python bench/bench_lora_forward.py --layers [--rank 64]
    python bench/bench_lora_forward.py --precision --lora STORE/mlcd/<fp>/lora.safetensors

`--precision` measures how far each mode's bfloat16 output (weights and LoRA in bfloat16, as the CPU sampling stages
load them) is from the float32 one, with a trained toy-hard LoRA, relative to the LoRA's effect on the output.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from _toy import mlcd_overrides, run_mlcd
from common import report, timed
from tlcm_core.config import load_config
from tlcm_core.lora import set_lora_forward
from tlcm_core.pipeline import run_pipeline
from tlcm_core.progress import SilentReporter


# (what, layer, input shape): the toy UNet's convs at MLCD's per-process batch of 16, SDXL's at one 1024 px image
LAYERS = (
    ("toy UNet, 3x3 conv 32 ch at 16x16, batch 16", lambda: torch.nn.Conv2d(32, 32, 3, padding=1), (16, 32, 16, 16)),
    ("toy UNet, 3x3 conv 64 ch at 8x8, batch 16", lambda: torch.nn.Conv2d(64, 64, 3, padding=1), (16, 64, 8, 8)),
    ("toy UNet, 3x3 conv 96 ch at 4x4, batch 16", lambda: torch.nn.Conv2d(96, 96, 3, padding=1), (16, 96, 4, 4)),
    ("SDXL UNet, 3x3 conv 640 ch at 64x64", lambda: torch.nn.Conv2d(640, 640, 3, padding=1), (1, 640, 64, 64)),
    ("SDXL UNet, 3x3 conv 1280 ch at 32x32", lambda: torch.nn.Conv2d(1280, 1280, 3, padding=1), (1, 1280, 32, 32)),
    ("SDXL UNet, attention projection 1280 -> 1280, 1024 tokens", lambda: torch.nn.Linear(1280, 1280),
     (1, 1024, 1280)),
)


def saved_bytes(net: torch.nn.Module, step) -> int:
    """Bytes autograd keeps for the backward pass of `step()`, beyond the network's parameters."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:  # each storage once
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total


def layer_rows(rank: int, repeats: int) -> list[dict]:
    from peft import LoraConfig, inject_adapter_in_model

    rows = []
    for what, make, shape in LAYERS:
        torch.manual_seed(0)
        net = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]),
                                      torch.nn.Sequential(make()))
        for n, p in net.named_parameters():
            p.requires_grad_("lora_" in n)  # the base frozen, as in training
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.01)
        x = torch.randn(shape)

        def step():
            net.zero_grad(set_to_none=True)
            net(x).square().mean().backward()

        row = {"layer": what}
        for mode in ("separate", "merged"):
            set_lora_forward(net, mode)
            row[f"{mode}, ms"] = 1000 * timed(step, repeats)
            row[f"{mode}, saved MB"] = saved_bytes(net, step) / 2**20
        row["merged / separate time"] = row["merged, ms"] / row["separate, ms"]
        rows.append(row)
    return rows


def precision_rows(lora_path: str, n: int = 16) -> list[dict]:
    from safetensors.torch import load_file

    from tlcm_core.lora import adapters_disabled, load_lora_into
    from tlcm_core.models import load_unet
    from tlcm_core.toy.pipeline import POOLED_DIM, TEXT_DIM

    cfg, state = load_config("toy-hard", []), load_file(lora_path)
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(n, 4, 16, 16, generator=g), timestep=torch.randint(1, 1000, (n,), generator=g),
                  encoder_hidden_states=torch.randn(n, 7, 2 * TEXT_DIM, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(n, POOLED_DIM, generator=g),
                                     "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(n, 1)})

    def network(dtype):
        net = load_unet(cfg.teacher, torch.device("cpu"), dtype)
        load_lora_into(net, state, cfg.lora)
        cast = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()
                if k != "added_cond_kwargs"}
        cast["added_cond_kwargs"] = {k: v.to(dtype) for k, v in inputs["added_cond_kwargs"].items()}
        return net, cast

    net, cast = network(torch.float32)
    with torch.no_grad():
        ref = net(**cast).sample
        with adapters_disabled(net):
            effect = (ref - net(**cast).sample).norm()
    rows = [{"weights": "float32", "lora_forward": "separate", "|out - float32| / |LoRA's effect|": 0.0,
             "|LoRA's effect| / |out|": float(effect / ref.norm())}]
    net, cast = network(torch.bfloat16)
    for mode in ("separate", "merged"):
        set_lora_forward(net, mode)
        with torch.no_grad():
            out = net(**cast).sample.float()
        rows.append({"weights": "bfloat16", "lora_forward": mode,
                     "|out - float32| / |LoRA's effect|": float((out - ref).norm() / effect),
                     "|LoRA's effect| / |out|": ""})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "tlcm-bench-lora-forward"))
    ap.add_argument("--layers", action="store_true", help="time single layers of the toy's and SDXL's shapes")
    ap.add_argument("--repeats", type=int, default=3, help="with --layers: the best of this many timed steps")
    ap.add_argument("--precision", action="store_true", help="bfloat16 outputs of each mode against float32")
    ap.add_argument("--lora", help="with --precision: a trained toy-hard lora.safetensors")
    args = ap.parse_args()
    if args.precision:
        if not args.lora:
            ap.error("--precision needs --lora STORE/mlcd/<fingerprint>/lora.safetensors (a toy-hard run's)")
        torch.set_num_threads(1)
        report("compute.lora_forward in bfloat16 (toy-hard UNet with a trained LoRA, 16 random inputs)",
               precision_rows(args.lora),
               notes=f"LoRA {args.lora}; the LoRA's effect is the float32 output with the adapter on less off")
        return
    if args.layers:
        torch.set_num_threads(1)
        report(f"compute.lora_forward, one LoRA layer at rank {args.rank} (forward + backward, one thread, best of "
               f"{args.repeats})", layer_rows(args.rank, args.repeats),
               notes="saved MB: what autograd keeps for the backward pass beyond the parameters (the input, and for "
                     "merged the adapted weight W + B A alpha/r; for separate A's output)")
        return
    base = mlcd_overrides(args.work_dir, args.samples, args.iterations) + [f"lora.rank={args.rank}",
                                                                             f"lora.alpha={args.rank}"]
    run_pipeline(load_config("toy-hard", base), stages=["teacher-trajectories"], reporter=SilentReporter())
    rows, ref = [], None
    for procs, mode in ((1, "separate"), (1, "merged"), (2, "separate"), (2, "merged")):
        m, lora = run_mlcd(base + [f"compute.lora_forward={mode}", f"compute.cpu_processes={procs}",
                                   "compute.num_threads=1"], ref)
        ref = ref or lora
        same = [r for r in rows if r["processes"] == procs]
        rows.append({"processes": procs, "lora_forward": mode, "stage wall, s": m["stage wall, s"],
                     "steps/s": m["steps/s"],
                     "speed-up over separate": m["steps/s"] / same[0]["steps/s"] if same else 1.0,
                     "max |LoRA - 1 process, separate|": m["max |LoRA - ref|"], "max |LoRA|": m["max |LoRA|"]})
    report(f"compute.lora_forward on a CPU (toy-hard MLCD, rank {args.rank}, {args.iterations} steps at batch 32, "
           "one thread per process)", rows,
           notes=f"cpu count {os.cpu_count()}; torch {torch.__version__}; the stage's wall time includes loading "
                 "the UNet and starting the processes")


if __name__ == "__main__":
    main()
