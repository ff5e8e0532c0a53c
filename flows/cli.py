"""The `tlcm` command.

  tlcm distill --config toy                 run every stage of a preset (in process, ephemeral Prefect)
  tlcm eval --config toy --lora none --steps 1,2,4,25 --json
  tlcm eval --config toy --lora other.safetensors --scheduler lcm --steps 2,4 --json   (another method's LoRA)
  tlcm artifacts ls|show --store URL [--json]
  tlcm report --config toy --store URL [--out report.md]   the run report of a finished run
  tlcm toy-teacher [--out DIR] [--flow]     retrain the shipped toy teacher (or the flow one)
  tlcm stack up|down|status [--s3]          a local Prefect server, work pool, workers (and S3) for deployments
  tlcm export --lora URI --out DIR          diffusers / kohya / PEFT files, TLCM scheduler, model card
  tlcm generate --lora URI --prompt TEXT --steps 4 --seed 0 --out image.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from tlcm_core.errors import UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="toy", help="preset name (toy, toy-fast, toy-hard, toy-hard-fast, toy-flow, "
                   "toy-flow-fast, sdxl, sd15, flux-dev, sd35) or a YAML path")
    p.add_argument("--store", default=None, help="artifact store URL: a folder or s3://bucket/prefix "
                   "(default: the config's store.url)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set mlcd.lr=2e-4 (repeatable)")


def _load(args):
    from tlcm_core.config import resolve_config  # not flows.tlcm: eval/export/artifacts never import Prefect

    return resolve_config(args.config, args.store, args.overrides)


def _check_before_prefect(cfg, stages: list[str] | None, force: list[str] | None) -> None:
    """Everything a run can be refused for (stage names, store access, what the stages will need), before Prefect
    is imported or started: the same `plan_run` the flow, dispatch and run_pipeline start with. Raises UserError."""
    from tlcm_core.pipeline import plan_run

    # a deployments dispatcher only reads manifests; its workers write
    plan_run(cfg, stages, force, access="read" if cfg.dispatch == "deployments" else "write")


def cmd_distill(args) -> int:
    cfg = _load(args)  # validate before Prefect starts
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    _check_before_prefect(cfg, stages, args.force)
    from flows.tlcm import tlcm

    results = tlcm(config=cfg.model_dump(mode="json"), stages=stages, force=args.force or None,
                   bars=sys.stderr.isatty() or args.progress)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for r in results:
            print(f"{r['stage']:>22}: {'cache hit' if r['cached'] else 'computed '}  {r['uri']}")
        ev = next((r for r in results if r["stage"] == "evaluate"), None)
        if ev:
            from tlcm_core.evaluation import markdown_table

            print(markdown_table(ev["summary"]["rows"]))
    return 0


def cmd_eval(args) -> int:
    from tlcm_core.models import setup_threads

    if args.samples:
        args.overrides.append(f"evaluate.num_samples={args.samples}")
    if args.sampler:
        args.overrides.append(f"evaluate.sampler={args.sampler}")
    if args.milestone_grid:
        args.overrides.append(f"evaluate.milestone_grid={args.milestone_grid}")
    cfg = _load(args)
    steps = _int_list("--steps", args.steps)
    teacher_steps = _int_list("--teacher-steps", args.teacher_steps) if args.teacher_steps else None
    lora = None
    if args.lora == "none":
        fmt = None if args.lora_format == "auto" else args.lora_format
        given = [f for f, v in (("--scheduler", args.scheduler), ("--guidance", args.guidance), ("--lora-format", fmt))
                 if v is not None]
        if given:
            raise UserError(f"{', '.join(given)}: only with --lora FILE (the teacher's rows are DDIM + CFG with "
                            "evaluate.teacher_guidance, else schedule.guidance)")
    else:  # refused (missing, unreadable, wrong rank, other base model, no scheduler) before the teacher loads
        from tlcm_core.evaluation import eval_lora

        lora = eval_lora(args.lora, cfg, args.lora_format, args.scheduler, args.guidance)
    from tlcm_core.evaluation import evaluate_rows, markdown_table
    from tlcm_core.progress import Reporter

    setup_threads(cfg.compute)
    rows = evaluate_rows(cfg, lora, steps, Reporter(bars=not args.json and sys.stderr.isatty()),
                         include_teacher_steps=teacher_steps)
    print(json.dumps(rows, indent=2) if args.json else markdown_table(rows))
    return 0


def _int_list(flag: str, text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated whole numbers, e.g. {flag} 1,2,4") from None


def cmd_artifacts(args) -> int:
    from tlcm_core.store import ArtifactStore

    url = args.store or _load(args).store.url
    store = ArtifactStore(url)
    if args.action == "ls":
        ms = store.list()
        if args.json:
            print(json.dumps([m.model_dump(mode="json") | {"uri": store.artifact(m.stage, m.fingerprint).uri}
                              for m in ms], indent=2, default=str))
        else:
            for m in ms:
                size = sum(f.size for f in m.files.values())
                print(f"{m.stage:>22}  {m.fingerprint}  {m.created:%Y-%m-%d %H:%M}  {size / 1e6:9.2f} MB  "
                      f"{store.artifact(m.stage, m.fingerprint).uri}")
            if not ms:
                print(f"no complete artifacts under {url}")
        return 0
    if not args.uri:
        raise UserError("tlcm artifacts show needs an artifact URI (or STAGE/FINGERPRINT), e.g. "
                        "`tlcm artifacts show mlcd/<fingerprint>`; `tlcm artifacts ls` lists them")
    art = store.open_uri(args.uri) if "/" in args.uri and (args.uri.startswith(url) or "://" in args.uri) \
        else store.artifact(*args.uri.split("/", 1))
    m = art.manifest(verify="checksum" if args.verify else "size")
    print(json.dumps(m.model_dump(mode="json"), indent=2, default=str) if args.json else
          f"{art.uri}\nstage: {m.stage}\nfingerprint: {m.fingerprint}\ncreated: {m.created}\n"
          f"inputs: {json.dumps(m.inputs, indent=2)}\nsummary: {json.dumps(m.summary, indent=2, default=str)}\n"
          f"files: {len(m.files)} ({sum(f.size for f in m.files.values()) / 1e6:.2f} MB)")
    return 0


def cmd_report(args) -> int:
    """The run report of the config's finished run, from the store alone (no Prefect)."""
    from tlcm_core.report import build_report, build_report_from_store

    if args.config is None:  # the store alone: its newest evaluated run
        from tlcm_core.config import StoreConfig

        report = build_report_from_store(args.store or StoreConfig().url, args.evaluate)
    else:
        report = build_report(_load(args))
    if args.out:
        report.write(args.out)
        print(f"{args.out} ({len(report.images)} images beside it)")
    else:
        print(report.markdown)
        print(f"(images not written: --out FILE writes {', '.join(report.images)} beside the report)", file=sys.stderr)
    return 0


def cmd_toy_teacher(args) -> int:
    if args.flow:
        from tlcm_core.toy.flow_teacher import ToyFlowTeacherSettings, train_toy_flow_teacher

        steps = {"steps": args.steps} if args.steps else {}
        settings = ToyFlowTeacherSettings(world=args.world or "toy-hard", **steps)
        print(train_toy_flow_teacher(settings, args.out, resume=True))
        return 0
    from tlcm_core.toy.teacher import ToyTeacherSettings, train_toy_teacher

    settings = ToyTeacherSettings.for_world(args.world or "toy")
    if args.steps:
        settings = settings.model_copy(update={"unet_steps": args.steps})
    out = train_toy_teacher(settings, args.out, resume=True)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tlcm", description="Data-free TLCM distillation of latent diffusion models "
                                 "into few-step LoRAs (a Prefect pipeline of cached artifact stages).")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="run the pipeline's stages (cached stages are skipped)")
    _config_args(d)
    d.add_argument("--stages", help="comma-separated subset of stages to run (default: the config's)")
    d.add_argument("--force", action="append", metavar="STAGE", help="recompute STAGE and what depends on it")
    d.add_argument("--json", action="store_true", help="print the stage results as JSON")
    d.add_argument("--progress", action="store_true", help="progress bars even without a terminal")
    d.set_defaults(func=cmd_distill)

    e = sub.add_parser("eval", help="sample the teacher (--lora none) or a student LoRA and print metrics")
    _config_args(e)
    e.add_argument("--lora", default="none", help="'none' (the teacher with DDIM + CFG), a lora.safetensors path/URL, "
                   "an mlcd/lcd/finetune artifact URI, or another method's few-step LoRA (with --scheduler)")
    e.add_argument("--steps", default="1,2,3,4,8", help="comma-separated step counts")
    e.add_argument("--teacher-steps", default=None, help="also evaluate the teacher at these step counts")
    e.add_argument("--samples", type=int, default=None, help="samples per row (default evaluate.num_samples)")
    e.add_argument("--sampler", choices=["renoise", "multistep"], default=None)
    e.add_argument("--milestone-grid", choices=["official", "sigma"], default=None,
                   help="which milestones N steps visit (default evaluate.milestone_grid; docs/flow-matching.md)")
    e.add_argument("--lora-format", choices=["auto", "tlcm", "diffusers"], default="auto",
                   help="auto: tlcm when the file has tlcm-lora/1 metadata, else diffusers (diffusers' "
                   "load_lora_weights: diffusers or kohya keys, e.g. LCM-LoRA, TCD, PCM, Hyper-SD, DMD2, Lightning)")
    e.add_argument("--scheduler", choices=["tlcm", "lcm", "tcd", "euler-trailing", "ddim-trailing"], default=None,
                   help="how the LoRA is sampled: tlcm (the TLCM sampler; default for TLCM LoRAs) or the stock "
                   "diffusers scheduler its method uses (required for other LoRAs): lcm (LCM-LoRA, DMD2), tcd (TCD, "
                   "PCM), euler-trailing (SDXL-Lightning), ddim-trailing (Hyper-SD)")
    e.add_argument("--guidance", type=float, default=None, help="CFG scale with a stock --scheduler (default 1: "
                   "none, as distilled LoRAs are sampled; > 1 adds CFG)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    a = sub.add_parser("artifacts", help="list or show artifacts in a store")
    a.add_argument("action", choices=["ls", "show"])
    a.add_argument("uri", nargs="?", help="for show: an artifact URI or STAGE/FINGERPRINT")
    _config_args(a)
    a.add_argument("--verify", action="store_true", help="for show: verify every file's checksum")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_artifacts)

    r = sub.add_parser("report", help="the run report of a finished run: teacher vs student, side-by-side samples, "
                       "loss curves, stage times and artifacts (Markdown)")
    _config_args(r)
    r.set_defaults(config=None)  # no --config: the store's newest evaluated run, found from its manifests
    r.add_argument("--evaluate", default=None, metavar="FINGERPRINT",
                   help="with --store alone: the evaluate artifact to report (a fingerprint prefix; default newest)")
    r.add_argument("--out", default=None, help="write the report to this file and its images beside it "
                   "(default: print the Markdown)")
    r.set_defaults(func=cmd_report)

    t = sub.add_parser("toy-teacher", help="(re)train the toy world's teacher (resumes from checkpoints in --out)")
    t.add_argument("--out", default="./toy-teacher")
    t.add_argument("--world", default=None)
    t.add_argument("--steps", type=int, default=None, help="UNet (or transformer) training steps (default: the "
                   "shipped settings)")
    t.add_argument("--flow", action="store_true", help="the world's SD3-shaped flow-matching teacher (default world "
                   "toy-hard; its VAE is the world's UNet teacher's)")
    t.set_defaults(func=cmd_toy_teacher)

    from flows.stack import add_parser as add_stack_parser

    add_stack_parser(sub)

    from flows.cli_tools import add_export_parser, add_generate_parser

    add_export_parser(sub, _config_args)
    add_generate_parser(sub)
    return ap


def _exit_on_sigterm(signum, frame):
    """SIGTERM (`kill`, a scheduler, a container stop) unwinds like Ctrl-C: finally blocks and atexit hooks run, so
    Prefect's ephemeral API server (a child uvicorn process) is stopped instead of orphaned, leases are released and
    open checkpoints are closed. Work already committed stays; a rerun resumes."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main else None
    try:
        return _run(args)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return args.func(args)
    except UserError as e:  # bad input or an unusable artifact: say what to fix, no traceback (tlcm_core/errors.py)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
