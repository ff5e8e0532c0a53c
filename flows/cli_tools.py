"""`tlcm export` and `tlcm generate`: what users do with a trained LoRA.

  tlcm export --lora ARTIFACT_OR_FILE --out DIR [--formats diffusers,kohya,peft] [--base SRC]
  tlcm generate --lora PATH|URI --prompt "a red circle" --steps 4 --seed 0 --out circle.png
  tlcm generate --lora PATH|URI --prompts prompts.txt --steps 4 --out images/
"""

from __future__ import annotations

import json
import re
import sys

from tlcm_core.errors import UserError

# User errors (tlcm_core.errors.UserError: a bad LoRA, prompts file or export option) propagate to flows/cli.py's
# main, which prints them as one `error: ...` line and exits 2.


def cmd_export(args) -> int:
    from tlcm_core.config import resolve_config
    from tlcm_core.generate import base_teacher
    from tlcm_core.lora import _read, read_lora
    from tlcm_core.lora_files import base_configs, export_files, write_files

    if args.formats:
        args.overrides.append(f"export.formats=[{args.formats}]")
    cfg = resolve_config(args.config, args.store, args.overrides)
    lf = read_lora(args.lora)
    teacher = base_teacher(lf, args.base)
    unet_config, sched_config = base_configs(teacher)
    root = args.lora.rstrip("/")
    manifest = None if args.lora.endswith(".safetensors") else _read(f"{root}/manifest.json")
    training = None
    if manifest:
        m = json.loads(manifest)
        training = {"stage": m.get("stage"), "artifact": root, "config": m.get("config"), "inputs": m.get("inputs"),
                    "summary": m.get("summary")}
    metrics = json.loads(_read(args.metrics) or b"null") if args.metrics else None
    segments = lf.segments or cfg.schedule.segments
    files = export_files(lf.state, lf.metadata, list(cfg.export.formats), unet_config, sched_config,
                         segments=segments, sampler=cfg.export.sampler, steps=cfg.export.steps,
                         milestone_grid=cfg.export.milestone_grid,
                         kohya_naming=cfg.export.kohya_naming, training=training, metrics=metrics, where=lf.url)
    for url in write_files(files, args.out):
        print(url)
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "image"


def _save_png(image, url: str) -> None:
    import io

    import fsspec

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, buf.getvalue())


def cmd_generate(args) -> int:
    from tlcm_core.generate import base_teacher, check_base, generate, image_grid, upscale_for_viewing
    from tlcm_core.lora import read_lora
    from tlcm_core.prompts import load_prompts

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += load_prompts(args.prompts)
    if not prompts:
        raise UserError("tlcm generate has no prompt: give --prompt TEXT (repeatable) and/or --prompts FILE")
    lf = read_lora(args.lora)
    teacher = base_teacher(lf, args.base, args.resolution)
    if args.base is None:
        check_base(lf, teacher)
    elif lf.base.get("source") not in (None, args.base):
        print(f"note: {lf.url} was trained on {lf.base.get('source')}; generating with --base {args.base}",
              file=sys.stderr)
    segments = args.segments or lf.segments or 8
    sampler = args.sampler or lf.sampler or "renoise"
    grid = args.milestone_grid or lf.milestone_grid or "official"
    try:
        images = generate(teacher, lf.state, prompts, args.steps, args.seed, lora=lf.config, segments=segments,
                          sampler=sampler, milestone_grid=grid, batch_size=args.batch_size, device=args.device)
    except ValueError as e:  # e.g. more steps than segments
        if isinstance(e, UserError):
            raise
        raise UserError(f"tlcm generate --steps {args.steps} --segments {segments}: {e}") from None
    shown = [upscale_for_viewing(im, factor=args.scale) for im in images] if args.scale != 1 else images
    out = args.out
    written = []
    if len(shown) == 1 and out.lower().endswith(".png"):
        _save_png(shown[0], out)
        written.append(out)
    else:
        if out.lower().endswith(".png"):  # several images and a file name: the grid there, the images beside it
            stem, folder = out[:-4], None
            grid_url = out
        else:
            folder = out.rstrip("/")
            stem, grid_url = None, f"{folder}/grid.png"
        for i, (im, p) in enumerate(zip(shown, prompts)):
            url = f"{stem}-{i:03d}.png" if stem else f"{folder}/{i:03d}-{_slug(p)}.png"
            _save_png(im, url)
            written.append(url)
        _save_png(image_grid(shown), grid_url)
        written.append(grid_url)
    for url in written:
        print(url)
    return 0


def add_export_parser(sub, config_args) -> None:
    x = sub.add_parser("export", help="write a LoRA as diffusers / kohya / PEFT files + ComfyUI workflow + TLCM "
                       "scheduler + model card")
    config_args(x)
    x.add_argument("--lora", required=True, help="a lora.safetensors path/URL or an mlcd/lcd/finetune artifact URI")
    x.add_argument("--out", required=True, help="output folder (any fsspec URL)")
    x.add_argument("--formats", default=None, help="comma-separated subset of diffusers,kohya,peft; kohya comes "
                   "with a ComfyUI workflow (default: the config's export.formats, all three)")
    x.add_argument("--base", default=None, help="base model (default: the one in the LoRA's metadata)")
    x.add_argument("--metrics", default=None, help="a metrics.json (from evaluate) to put in the model card")
    x.set_defaults(func=cmd_export)


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate images with a TLCM LoRA (the base's diffusers pipeline + the TLCM "
                       "scheduler: TLCMScheduler, or FlowMatchTLCMScheduler for FLUX.1 / SD3)")
    g.add_argument("--lora", required=True, help="lora.safetensors path/URL, a training artifact URI, or an "
                   "export folder")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", default=None, help="a text file (any fsspec URL), one prompt a line")
    g.add_argument("--steps", type=int, default=4, help="sampling steps, 1..segments (2-8 for the paper's LoRAs)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--out", default="tlcm.png", help="a .png for one prompt; a folder (or a .png for the grid) for "
                   "several")
    g.add_argument("--base", default=None, help="base model: hub id, folder or URL (default: the LoRA's metadata)")
    g.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the base's)")
    g.add_argument("--segments", type=int, default=None, help="milestone segments M (default: from the LoRA's "
                   "artifact or export, else 8)")
    g.add_argument("--sampler", choices=["renoise", "multistep"], default=None)
    g.add_argument("--milestone-grid", choices=["official", "sigma"], default=None,
                   help="which milestones N steps visit: the release's index grid, or those at evenly spaced noise "
                   "levels (default: from an export folder's scheduler config, else official)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    g.add_argument("--scale", type=int, default=0, help="nearest-neighbour upscale of the saved PNGs; 0 = automatic "
                   "(small images to >= 256 px), 1 = none")
    g.set_defaults(func=cmd_generate)


__all__ = ["add_export_parser", "add_generate_parser", "cmd_export", "cmd_generate"]
