"""A training checkpoint's student as a TLCM LoRA file, to evaluate a stage part-way through its run.

A trainer keeps its last two checkpoints (`checkpoints/step-N/weights.safetensors`, the student's PEFT tensors under
`student.` with the adapter's name in each key). This writes those weights with the keys and metadata of the
artifact's own `lora.safetensors`, so `tlcm eval --lora OUT` samples the student as it was at step N. With a constant
learning rate after warm-up, the step-N checkpoint of a longer run is the N-step run's LoRA (bench/RESULTS.md).

    python bench/checkpoint_lora.py STORE/finetune/<fp> --step 350 --out /tmp/step350.safetensors
    tlcm eval --config toy-hard --lora /tmp/step350.safetensors --steps 2,4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tlcm_core.lora import ADAPTER, split_prefix


def checkpoint_lora(artifact: Path, step: int, out: Path, prefix: str = "checkpoints") -> int:
    """Write step `step`'s student weights as `out`; the number of tensors written."""
    ckpt = artifact / prefix / f"step-{step:08d}" / "weights.safetensors"
    final = artifact / "lora.safetensors"
    if not ckpt.exists():
        kept = sorted(p.name for p in (artifact / prefix).glob("step-*"))
        raise SystemExit(f"{ckpt}: no such checkpoint (kept: {', '.join(kept) or 'none'})")
    with safe_open(str(final), "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    network, _ = split_prefix(dict.fromkeys(keys), where=str(final))  # "unet." / "transformer."
    tag = f".{ADAPTER}."
    state = {f"{network}{k[len('student.'):].replace(tag, '.')}": v
             for k, v in load_file(str(ckpt)).items() if k.startswith("student.")}
    if set(state) != keys:
        odd = sorted(set(state) ^ keys)[:3]
        raise SystemExit(f"{ckpt}: the student's keys are not those of {final} (e.g. {odd})")
    save_file(state, str(out), metadata=metadata)
    return len(state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path, help="a training stage's artifact folder (it holds lora.safetensors)")
    ap.add_argument("--step", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prefix", default="checkpoints", help="checkpoints/phase-N for a finetune phase")
    args = ap.parse_args()
    n = checkpoint_lora(args.artifact, args.step, args.out, args.prefix)
    print(f"{args.out}: {n} tensors from step {args.step}", file=sys.stderr)


if __name__ == "__main__":
    main()
