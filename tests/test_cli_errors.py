"""One front door for user errors: the real `tlcm` command, run as a subprocess on bad input, prints one clear
`error: ...` line that names the culprit, exits non-zero, shows no traceback, and never imports (let alone starts)
Prefect.

tests/test_bad_inputs.py checks the library layer (which error, raised before which work); this file checks what a
user sees at the command line. Every case runs in its own process with its own PREFECT_HOME: importing Prefect
creates that folder, so its absence proves the command never reached Prefect. The cases run three at a time; the
whole file needs about 30 s of CPU (under a minute on 2 shared cores, unless they are busy).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOY_CONFIG = ["--config", "toy-fast"]
PREFECT_STARTUP = ("Starting temporary server", "Stopping temporary server", "prefect.", "Prefect")
MAX_SECONDS = 45  # generous for 2 shared cores; a run that starts Prefect's server takes ~25 s before any stage


@dataclass
class Case:
    argv: list[str]
    first: list[str]  # substrings of the first stderr line (which starts with "error:")
    anywhere: tuple[str, ...] = ()  # substrings of stderr (a config report lists one field a line)
    as_nobody: bool = False


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float
    prefect_home_created: bool


def _safetensors(path: Path, tensors: dict, metadata: dict | None) -> str:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({k: np.zeros(shape, dtype=np.float32) for k, shape in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def _cases(root: Path, shared: Path) -> dict[str, Case]:
    """Bad inputs, each with what the first line of the error must name."""
    bad_yaml = root / "bad.yaml"
    bad_yaml.write_text("base: toy-fast\nmlcd:\n  lr: [1e-4\n")
    not_a_folder = root / "not-a-folder"
    not_a_folder.write_text("x")
    store = root / "store"
    corrupt = root / "corrupt-store" / "mlcd" / "0123456789abcdef"
    corrupt.mkdir(parents=True)
    (corrupt / "manifest.json").write_text("{not json")
    lora_cfg = json.dumps({"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["to_q"]})
    meta = {"format": "tlcm-lora/1", "lora_config": lora_cfg, "base_model": json.dumps({"source": "toy"})}
    wrong_rank = _safetensors(root / "wrong-rank.safetensors",
                              {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (8, 32),
                               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": (32, 8)},
                              meta)
    foreign = _safetensors(root / "foreign.safetensors", {"lora_unet_down.lora_down.weight": (4, 32)}, None)
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3 + b"definitely not safetensors")
    missing_lora = str(root / "no-such-dir" / "lora.safetensors")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\n")
    distill = ["distill", *TOY_CONFIG, "--store", str(store)]
    lpips_file = ["--set", "mlcd.distance=latent-lpips", "--set", "latent_lpips.source=file"]
    missing_lpips = str(root / "latent-lpips.pth")
    zero = ["--set", "stages=[teacher-trajectories,mlcd,finetune]", "--set", "finetune.reward_weight=0",
            "--set", "finetune.dmd_weight=0", "--set", "finetune.gan_weight=0"]
    cases = {
        "unknown-preset": Case(["distill", "--config", "toy-fastt"], ["'toy-fastt'", "neither a preset"]),
        "malformed-yaml": Case(["distill", "--config", str(bad_yaml)], [str(bad_yaml), "malformed YAML"]),
        "unknown-key": Case([*distill, "--set", "mlcd.lrr=1e-4"], ["invalid config", "mlcd.lrr=1e-4"],
                            ("mlcd.lrr: unknown key",)),
        "out-of-range": Case([*distill, "--set", "mlcd.lr=-1"], ["invalid config", "mlcd.lr=-1"],
                             ("mlcd.lr = -1: Input should be greater than 0",)),
        "override-syntax": Case([*distill, "--set", "mlcd.lr"], ["'mlcd.lr'", "section.field=value"]),
        "unknown-stage": Case([*distill, "--stages", "teacher-trajectories,distil"], ["'distil'", "unknown stage"]),
        # a real teacher's id is planned without loading anything (the toy teacher's weights are hashed: slower)
        "force-not-in-pipeline": Case(["distill", "--config", "sd15", "--store", str(store), "--set",
                                       "stages=[teacher-trajectories,mlcd]", "--set", f"trajectories.prompts={prompts}",
                                       "--force", "lcd"], ["'lcd'", "not part of this config's pipeline"]),
        "store-under-a-file": Case(["distill", *TOY_CONFIG, "--store", str(not_a_folder / "artifacts")],
                                   [str(not_a_folder / "artifacts"), "writable path"]),
        "missing-prompts": Case([*distill, "--set", "trajectories.prompts=/nonexistent/prompts.txt"],
                                ["'/nonexistent/prompts.txt'", "not found", "trajectories.prompts"]),
        "finetune-without-a-loss": Case([*distill, *zero], ["invalid config"],
                                        ("finetune.reward_weight, finetune.dmd_weight, finetune.gan_weight, "
                                         "finetune.regression_weight are all 0", "finetune.dmd_weight=1")),
        "eval-missing-lora": Case(["eval", *TOY_CONFIG, "--lora", missing_lora],
                                  [missing_lora, "no TLCM LoRA"]),
        "eval-garbage-lora": Case(["eval", *TOY_CONFIG, "--lora", str(garbage)],
                                  [str(garbage), "not a readable safetensors file"]),
        "eval-bad-steps": Case(["eval", *TOY_CONFIG, "--steps", "1,two"], ["--steps 1,two"]),
        "generate-wrong-rank-lora": Case(["generate", "--lora", wrong_rank, "--prompt", "a red circle"],
                                         [wrong_rank, "rank(s) [8] but the metadata says 4"]),
        "generate-foreign-lora": Case(["generate", "--lora", foreign, "--prompt", "a red circle"],
                                      [foreign, "not a TLCM LoRA"]),
        "generate-missing-lora": Case(["generate", "--lora", missing_lora, "--prompt", "a red circle"],
                                      [missing_lora, "no TLCM LoRA"]),
        # the paper's distance from a weights file (the sdxl preset): checked before the teacher's pairs are made
        "latent-lpips-missing-weights": Case([*distill, *lpips_file, "--set", f"latent_lpips.weights={missing_lpips}"],
                                             [f"latent_lpips.weights={missing_lpips!r}", "no such file"]),
        "latent-lpips-foreign-weights": Case([*distill, *lpips_file, "--set", f"latent_lpips.weights={foreign}"],
                                             [foreign]),
        "artifacts-show-corrupt": Case(["artifacts", "show", "mlcd/0123456789abcdef", "--store",
                                        str(root / "corrupt-store")], [str(corrupt), "manifest.json is unreadable"]),
    }
    if os.geteuid() == 0:  # a shared volume the worker may only read: root can write anywhere, so run as nobody
        read_only = shared / "read-only-store"
        read_only.mkdir()
        os.chmod(read_only, 0o555)
        from tlcm_core.config import dump_config, load_config

        # the resolved preset as a file nobody can read: the checkout itself may sit in a folder only root can enter
        config = shared / "toy-fast.yaml"
        config.write_text(dump_config(load_config("toy-fast")))
        os.chmod(config, 0o644)
        cases["store-not-writable"] = Case(["distill", "--config", str(config), "--store", str(read_only)],
                                           [str(read_only), "no write permission"], as_nobody=True)
    else:
        read_only = root / "read-only-store"
        read_only.mkdir()
        os.chmod(read_only, 0o555)
        cases["store-not-writable"] = Case(["distill", *TOY_CONFIG, "--store", str(read_only)],
                                           [str(read_only), "no write permission"])
    return cases


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PREFECT_API_URL", None)
    return env


def _run(case: Case, home: Path) -> Result:
    if case.as_nobody:
        return _run_as_nobody(case, home)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.cli", *case.argv], cwd=REPO, env=_env(home), capture_output=True,
                       text=True, timeout=120)
    return Result(r.returncode, r.stdout, r.stderr, time.perf_counter() - t0, home.exists())


def _cli_as_nobody(argv: list[str], home: str, out: str, err: str) -> None:
    """The CLI's main() in a forked child that dropped to nobody (a new interpreter could not be exec'd as nobody:
    the venv's python may live under root's home). Uncaught exceptions print their traceback to `err` as usual."""
    os.environ.clear()
    os.environ.update(_env(Path(home)))
    # what the command imports, while the interpreter's files are still readable (root's home is not, to nobody)
    import traceback  # noqa: F401 - to print an unexpected error's traceback

    import flows.cli
    import tlcm_core.config
    import tlcm_core.pipeline  # noqa: F401 - plan_run, the stage registry and what they import
    import tlcm_core.store  # noqa: F401

    flows.cli.build_parser()
    tlcm_core.config.load_config("toy-fast")
    import fsspec

    fsspec.filesystem("file")  # fsspec imports its local filesystem class on first use
    os.setgid(65534)
    os.setgroups([])
    os.setuid(65534)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    had_prefect = "prefect" in sys.modules  # imported by an earlier test in this session: cannot tell
    code = flows.cli.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(99 if "prefect" in sys.modules and not had_prefect else code)


def _run_as_nobody(case: Case, home: Path) -> Result:
    import multiprocessing

    out, err = home.parent / f"{home.name}.out", home.parent / f"{home.name}.err"
    for f in (out, err):
        f.write_text("")
        os.chmod(f, 0o666)
    t0 = time.perf_counter()
    p = multiprocessing.get_context("fork").Process(target=_cli_as_nobody,
                                                    args=(case.argv, str(home), str(out), str(err)))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        p.join(10)
    return Result(p.exitcode, out.read_text(), err.read_text(), time.perf_counter() - t0, home.exists())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    shared = Path(tempfile.mkdtemp(prefix="tlcm-cli-errors-"))  # outside pytest's root-only tmp folders
    os.chmod(shared, 0o755)
    try:
        cases = _cases(root, shared)
        homes = {name: (shared if c.as_nobody else root) / f"prefect-home-{name}" for name, c in cases.items()}
        # slowest first (they import torch or plan the toy pipeline), three at a time on 2 cores
        order = sorted(cases, key=lambda n: not n.startswith(("missing-prompts", "eval", "generate", "force")))
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {name: pool.submit(_run, cases[name], homes[name]) for name in order}
            yield {name: (cases[name], f.result()) for name, f in futures.items()}
    finally:
        shutil.rmtree(shared, ignore_errors=True)


CASE_NAMES = ["unknown-preset", "malformed-yaml", "unknown-key", "out-of-range", "override-syntax", "unknown-stage",
              "force-not-in-pipeline", "store-under-a-file", "store-not-writable", "missing-prompts",
              "finetune-without-a-loss", "latent-lpips-missing-weights", "latent-lpips-foreign-weights",
              "eval-missing-lora", "eval-garbage-lora", "eval-bad-steps",
              "generate-wrong-rank-lora", "generate-foreign-lora", "generate-missing-lora", "artifacts-show-corrupt"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_bad_input_gets_one_clear_line_and_no_traceback(results, name):
    case, r = results[name]
    shown = f"rc={r.rc} in {r.seconds:.1f} s\nstdout:\n{r.out}\nstderr:\n{r.err}"
    assert r.rc == 2, shown
    assert "Traceback" not in r.err and "Traceback" not in r.out, shown
    first = r.err.splitlines()[0] if r.err else ""
    assert first.startswith("error: "), shown
    for s in case.first:
        assert s in first, (s, shown)
    for s in case.anywhere:
        assert s in r.err, (s, shown)
    if not first.startswith("error: invalid config"):  # a config report lists one field a line; all else: one line
        assert len(r.err.strip().splitlines()) == 1, shown
    assert r.out == "", shown
    # never got as far as Prefect: importing it creates PREFECT_HOME; starting its server prints these lines
    assert not r.prefect_home_created, shown
    assert not any(s in r.err for s in PREFECT_STARTUP), shown
    assert r.seconds < MAX_SECONDS, shown


def test_every_case_is_checked(results):
    assert sorted(results) == sorted(CASE_NAMES)


# ----------------------------------------------------------------------------------------------------------------
# What a run will use, and only that (config level and preflight)


def test_finetune_needs_a_loss_only_when_it_runs():
    from tlcm_core.config import ConfigError, load_config
    from tlcm_core.errors import UserError

    zero = ["finetune.reward_weight=0", "finetune.dmd_weight=0", "finetune.gan_weight=0"]
    load_config("toy-fast", zero)  # finetune not in stages: its weights do not matter
    load_config("toy-fast", ["stages=[teacher-trajectories,mlcd,finetune]", *zero[:2]])  # gan alone is a loss
    with pytest.raises(ConfigError) as err:
        load_config("toy-fast", ["stages=[teacher-trajectories,mlcd,finetune]", *zero])
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    assert "finetune.dmd_weight" in str(err.value) and "all 0" in str(err.value)


def test_preflight_needs_captions_only_for_real_metrics(tmp_path):
    """A real teacher's evaluate with metrics.kind=none reads no captions: a missing captions file is no reason to
    refuse the run. With real metrics it is, as a UserError naming the field (not a FileNotFoundError traceback)."""
    from tlcm_core.config import load_config
    from tlcm_core.errors import UserError
    from tlcm_core.pipeline import preflight

    missing = str(tmp_path / "captions_val2017.json")
    base = [f"store.url={tmp_path}", f"evaluate.metrics.captions={missing}"]
    preflight(load_config("sd15", [*base, "evaluate.metrics.kind=none"]), ["evaluate"])
    preflight(load_config("toy-fast", [*base, "evaluate.metrics.kind=toy"]), ["evaluate"])  # toy metrics: no captions
    for kind in ("auto", "real"):
        with pytest.raises(UserError) as err:
            preflight(load_config("sd15", [*base, f"evaluate.metrics.kind={kind}"]), ["evaluate"])
        assert "evaluate.metrics.captions" in str(err.value) and missing in str(err.value)


def test_preflight_checks_the_latent_lpips_weights_file_only_when_a_trainer_uses_it(tmp_path):
    """distance: latent-lpips with source=file (the sdxl preset): the weights file must exist and fit LatentLPIPS
    before any stage runs; a run whose trainers use MSE never looks at the file."""
    from tlcm_core.config import load_config
    from tlcm_core.errors import UserError
    from tlcm_core.losses import LatentLPIPS, save_latent_lpips
    from tlcm_core.pipeline import preflight

    good = tmp_path / "latent_lpips.safetensors"
    save_latent_lpips(LatentLPIPS(width=0.125), good)
    base = [f"store.url={tmp_path}", "latent_lpips.source=file", "lcd.distance=latent-lpips"]
    stages = ["teacher-trajectories", "mlcd", "lcd-trajectories", "lcd"]
    preflight(load_config("toy-fast", [*base, f"latent_lpips.weights={good}"]), stages)
    missing = [*base, f"latent_lpips.weights={tmp_path / 'latent-lpips.pth'}"]
    preflight(load_config("toy-fast", missing), stages[:2])  # lcd does not run: its weights are not looked at
    with pytest.raises(UserError) as err:
        preflight(load_config("toy-fast", missing), stages)
    assert "latent_lpips.weights" in str(err.value) and "lcd.distance=latent-lpips" in str(err.value)


def test_every_user_error_class_is_a_user_error():
    """The CLI catches UserError alone: each class of bad-input error must be one (and keep its historical base)."""
    from tlcm_core.config import ConfigError
    from tlcm_core.errors import UserError
    from tlcm_core.lease import LeaseLost, LeaseTimeout
    from tlcm_core.lora import LoRAError
    from tlcm_core.losses.latent_lpips import LatentLPIPSWeightsError
    from tlcm_core.metrics import MetricsError
    from tlcm_core.models import TeacherError
    from tlcm_core.prompts import PromptsError
    from tlcm_core.rewards import RewardError
    from tlcm_core.store import (CorruptArtifactError, IncompleteArtifactError, StoreError, StoreUnavailableError,
                                 UnsafePathError)

    for cls, old in [(ConfigError, ValueError), (PromptsError, ValueError), (LoRAError, ValueError),
                     (TeacherError, ValueError), (LatentLPIPSWeightsError, ValueError), (MetricsError, RuntimeError),
                     (RewardError, RuntimeError), (StoreError, RuntimeError), (CorruptArtifactError, StoreError),
                     (IncompleteArtifactError, StoreError), (UnsafePathError, ValueError),
                     (StoreUnavailableError, StoreError), (LeaseTimeout, TimeoutError), (LeaseLost, RuntimeError)]:
        assert issubclass(cls, UserError) and issubclass(cls, old), cls


def test_the_cli_modules_do_not_import_each_other_both_ways():
    """flows/cli.py registers cli_tools' commands; cli_tools needs nothing from cli (one-way import)."""
    text = (REPO / "flows" / "cli_tools.py").read_text()
    assert "flows.cli " not in text and "from flows.cli import" not in text and "import flows.cli\n" not in text
