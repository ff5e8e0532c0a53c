"""Stage `latent-lpips`: the latent LPIPS network that `distance: latent-lpips` uses, from a weights file, trained
on BAPPS 2AFC, or fitted data-free to a pixel metric of VAE-decoded pairs (tlcm_core/lpips_training.py)."""

from __future__ import annotations

import json

from ..losses.latent_lpips import load_latent_lpips, save_latent_lpips
from ..lpips_training import (WEIGHTS_FILE, _latent_mse, bapps_splits, make_pixel_distance, score_2afc,
                              train_latent_lpips_2afc, train_latent_lpips_datafree)
from ..models import load_schedule, load_vae, resolve_device, vae_decoder
from ..stage import Stage, StageContext


def run(ctx: StageContext) -> dict:
    """Write latent_lpips.safetensors, metrics.json (and train_log.jsonl when it trains)."""
    cfg, inputs, out_art, reporter = ctx.cfg, ctx.inputs, ctx.out, ctx.reporter
    lc = cfg.latent_lpips
    device = resolve_device(cfg.compute)
    log: list[dict] = []
    if lc.source == "file":
        model = load_latent_lpips(lc.weights, device=device)
        metrics: dict = {"weights": lc.weights}
        if lc.bapps_url:  # report its 2AFC agreement where data exists
            vae = load_vae(cfg.teacher, device)
            _, val, val_from = bapps_splits(lc.bapps_url, max_triplets=lc.max_triplets,
                                            image_size=lc.bapps_image_size, val_fraction=lc.val_fraction, seed=lc.seed)
            val = val.encode(vae, lc.batch_size)
            metrics.update(val=score_2afc(model, val, device), val_from=val_from,
                           baseline_latent_mse=score_2afc(_latent_mse, val, device))
    elif lc.source == "bapps":
        vae = load_vae(cfg.teacher, device)
        train, val, val_from = bapps_splits(lc.bapps_url, max_triplets=lc.max_triplets, image_size=lc.bapps_image_size,
                                            val_fraction=lc.val_fraction, seed=lc.seed)
        reporter.log(f"latent-lpips: {len(train)} train / {len(val)} val triplets ({val_from}); encoding with the VAE")
        fit = train_latent_lpips_2afc(train.encode(vae, lc.batch_size), val.encode(vae, lc.batch_size), width=lc.width,
                                      steps=lc.steps, lr=lc.lr, batch_size=lc.batch_size, seed=lc.seed, device=device,
                                      reporter=reporter, log_every=max(1, lc.steps // 20))
        model, log, metrics = fit.model, fit.log, {**fit.metrics, "val_from": val_from}
    else:
        if "pairs" not in inputs:
            raise ValueError("latent_lpips.source=datafree needs the teacher-trajectories artifact as inputs['pairs']")
        vae = load_vae(cfg.teacher, device)
        pixel, pixel_name = make_pixel_distance(cfg, device)
        fit = train_latent_lpips_datafree(inputs["pairs"], vae_decoder(vae), pixel, lc.steps,
                                          schedule=load_schedule(cfg.teacher), width=lc.width, num_pairs=lc.num_pairs,
                                          val_fraction=lc.val_fraction, lr=lc.lr, batch_size=lc.batch_size,
                                          seed=lc.seed, device=device, reporter=reporter, max_anchors=lc.num_pairs,
                                          log_every=max(1, lc.steps // 20))
        model, log, metrics = fit.model, fit.log, {**fit.metrics, "pixel_distance": pixel_name}
    metrics = {"source": lc.source, "width": model.width, **metrics}
    out_art.write_bytes(WEIGHTS_FILE, save_latent_lpips(model, source=lc.source))
    out_art.write_json("metrics.json", metrics)
    if log:
        out_art.write_bytes("train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log).encode())
        reporter.table("latent-lpips-loss", log, description="latent LPIPS training loss")
    summary = {"source": lc.source, "width": model.width}
    for key in ("heldout", "val"):
        if key in metrics:
            summary[key] = {k: v for k, v in metrics[key].items() if k != "per_subset"}
    reporter.log(f"latent-lpips: {json.dumps(summary)}")
    return summary


# implied: a trainer with `distance: latent-lpips` takes it as an input, so it runs whether or not `stages` lists it
STAGE = Stage("latent-lpips", version=2, run=run, reads=("latent_lpips", "teacher"),
              inputs=lambda cfg: {"pairs": "teacher-trajectories"} if cfg.latent_lpips.source == "datafree" else {},
              implied=True)
