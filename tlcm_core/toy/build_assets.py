"""Rebuild the shipped toy-world assets: ``python -m tlcm_core.toy.build_assets --work-dir DIR``.

1. the evaluator (``assets/<world>/evaluator.safetensors`` + ``.json``), unless present (``--force-evaluator``);
2. the teacher, trained (or resumed) in ``DIR`` with ``ToyTeacherSettings`` (defaults, or ``--settings JSON``);
3. copies ``DIR/pipeline`` to ``assets/<world>/teacher`` (UNet weights stored in fp16 unless ``--unet-fp32``) and the settings to ``teacher_settings.json``;
4. measures VAE reconstructions and the teacher at 1/2/4/8/25 DDIM steps -> ``assets/<world>/metrics.json``.

With ``--flow`` it builds the world's flow teacher instead (the UNet teacher's VAE and the evaluator must exist):
``ToyFlowTeacherSettings`` trains the SD3-shaped transformer in ``DIR``, ``assets/<world>/teacher-flow`` receives
the pipeline (transformer in fp16 storage), ``flow_teacher_settings.json`` the settings and ``flow_metrics.json``
the teacher sampled by its own Euler scheduler at 1/2/4/8/25 steps, at each ``--guidance-scale`` given.
Run with one thread (``OMP_NUM_THREADS=1``) for the timings recorded in metrics.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


# Evaluator training steps of each world's shipped evaluator (--evaluator-steps overrides); the teacher's settings
# are ToyTeacherSettings.for_world (--settings overrides).
EVALUATOR_STEPS: dict[str, int] = {"toy": 1500, "toy-hard": 2500}


def _store_half(f: Path) -> None:
    """fp16 *storage* halves the folder (diffusers upcasts to the model's fp32 on load); the metrics are measured on
    exactly these shipped weights."""
    from safetensors.torch import load_file, save_file

    save_file({k: v.half() for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})


def _ship(pipe_dir: Path, tdir: Path, network: str, fp32: bool, settings, settings_file: Path) -> None:
    """Copy the trained pipeline folder to the assets (the network's weights in fp16 storage unless `fp32`) and
    write its training settings beside it."""
    if tdir.exists():
        shutil.rmtree(tdir)
    shutil.copytree(pipe_dir, tdir)
    if not fp32:
        _store_half(tdir / network / "diffusion_pytorch_model.safetensors")
    settings_file.write_text(json.dumps(settings.model_dump(mode="json"), indent=2) + "\n")


def _count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def build_flow(args, dest: Path, ev) -> None:
    from diffusers import StableDiffusion3Pipeline

    from .flow_teacher import ToyFlowTeacherSettings, train_toy_flow_teacher
    from .metrics import measure_pipeline

    settings = ToyFlowTeacherSettings(world=args.world, **json.loads(args.settings))
    pipe_dir = train_toy_flow_teacher(settings, args.work_dir)
    train_info = json.loads((Path(args.work_dir) / "DONE.json").read_text())
    tdir = dest / "teacher-flow"
    _ship(pipe_dir, tdir, "transformer", args.unet_fp32, settings, dest / "flow_teacher_settings.json")
    pipe = StableDiffusion3Pipeline.from_pretrained(tdir)
    pipe.set_progress_bar_config(disable=True)
    scales = [float(g) for g in str(args.guidance_scale).split(",")]
    metrics = {
        "world": args.world,
        "threads": args.threads,
        "params": {k: _count(getattr(pipe, k)) for k in ("transformer", "vae", "text_encoder", "text_encoder_2",
                                                         "text_encoder_3")},
        "teacher_training": {"transformer": train_info["transformer"],
                             "wall_s_last_run": train_info.get("wall_s_this_run"),
                             "cpu_s_last_run": train_info.get("cpu_s_this_run")},
        "teacher": {f"{g:g}": measure_pipeline(pipe, ev, args.world, n=args.n, guidance_scale=g) for g in scales},
    }
    (dest / "flow_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for g, m in metrics["teacher"].items():
        print(f"guidance {g}:", json.dumps({k: (round(r["accuracy"], 4), round(r["fd"], 3))
                                             for k, r in m["steps"].items()}))


def main(argv: list[str] | None = None) -> None:
    from diffusers import StableDiffusionXLPipeline

    from . import TOY_ASSETS
    from .evaluator import ToyEvaluator, train_evaluator
    from .metrics import measure_pipeline, vae_reconstruction
    from .teacher import ToyTeacherSettings, train_toy_teacher

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="toy")
    ap.add_argument("--work-dir", required=True, help="teacher training folder (resumed if present)")
    ap.add_argument("--settings", default="{}", help="ToyTeacherSettings overrides as JSON")
    ap.add_argument("--evaluator-steps", type=int, default=None, help="default: EVALUATOR_STEPS of the world")
    ap.add_argument("--force-evaluator", action="store_true")
    ap.add_argument("--flow", action="store_true", help="build the world's flow teacher (teacher-flow/)")
    ap.add_argument("--guidance-scale", default="7.0", help="CFG scale(s) of the measurement, comma-separated with "
                                                            "--flow")
    ap.add_argument("--n", type=int, default=1024, help="samples per step count (>= 1024 for the Frechet distance)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unet-fp32", action="store_true", help="ship the UNet's (or transformer's) weights in fp32 "
                                                             "(default: fp16 storage)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    dest = TOY_ASSETS / args.world
    dest.mkdir(parents=True, exist_ok=True)
    ev_path = dest / "evaluator.safetensors"
    if args.force_evaluator or not ev_path.exists():
        train_evaluator(args.world, ev_path, steps=args.evaluator_steps or EVALUATOR_STEPS.get(args.world, 1500), seed=0)
    ev = ToyEvaluator.load(args.world)

    if args.flow:
        return build_flow(args, dest, ev)
    settings = ToyTeacherSettings.for_world(args.world, **json.loads(args.settings))
    t0 = time.time()
    pipe_dir = train_toy_teacher(settings, args.work_dir)
    train_info = json.loads((Path(args.work_dir) / "DONE.json").read_text())

    tdir = dest / "teacher"
    _ship(pipe_dir, tdir, "unet", args.unet_fp32, settings, dest / "teacher_settings.json")

    pipe = StableDiffusionXLPipeline.from_pretrained(tdir)
    pipe.set_progress_bar_config(disable=True)
    metrics = {
        "world": args.world,
        "threads": args.threads,
        "params": {k: _count(getattr(pipe, k)) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}
        | {"evaluator": _count(ev)},
        "latent_shape": [pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size],
        "scaling_factor": pipe.vae.config.scaling_factor,
        "teacher_training": {k: train_info[k] for k in ("vae", "unet", "scaling_factor")},
        "evaluator": json.loads(ev_path.with_suffix(".json").read_text()).get("training", {}),
        "vae_reconstruction": vae_reconstruction(pipe, ev, args.world),
        "teacher": measure_pipeline(pipe, ev, args.world, n=args.n, guidance_scale=float(args.guidance_scale)),
    }
    metrics["teacher_training"]["wall_s_last_run"] = train_info.get("wall_s_this_run")
    metrics["teacher_training"]["cpu_s_last_run"] = train_info.get("cpu_s_this_run")
    (dest / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: metrics["teacher"]["steps"][k]["accuracy"] for k in metrics["teacher"]["steps"]}))
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
