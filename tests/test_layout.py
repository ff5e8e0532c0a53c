"""The layering rules of docs/architecture.md, checked on the source: short functions, no import cycles, no stage
module importing another, tlcm_core free of Prefect, and each stage reading only the config it declares."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tlcm_core", "tasks", "flows")
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every project module `name` imports, at module level or inside a function (a lazy import is still a
    dependency)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in MODULES:  # `from pkg import name` imports pkg (and pkg.name if a module)
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_no_function_is_longer_than_80_lines():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines (split them):\n" + "\n".join(long)


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(GRAPH.get(n, ())):
            if m.startswith(n + "."):  # a package importing its own submodules is how packages are built
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(GRAPH):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail():
    GRAPH["tlcm_core.schedule"].add("tlcm_core.pipeline")  # pipeline -> ... -> schedule -> pipeline
    try:
        assert _cycle() is not None
    finally:
        GRAPH["tlcm_core.schedule"].discard("tlcm_core.pipeline")


def test_no_stage_module_imports_another_stage_module():
    from tlcm_core.stages import REGISTRY

    stage_modules = {f"tlcm_core.stages.{s.replace('-', '_')}" for s in REGISTRY}
    assert stage_modules <= set(MODULES), "every stage has its module tlcm_core/stages/<stage>.py"
    bad = [f"{m} imports {d}" for m in stage_modules for d in GRAPH[m] if d in stage_modules]
    assert not bad, bad


def test_the_library_never_imports_prefect_tasks_or_flows():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("tlcm_core"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{name} imports {m}" for m in mods if m.split(".")[0] in ("prefect", "tasks", "flows")]
    assert not bad, bad


def test_every_stage_is_declared_once_next_to_its_code():
    from tlcm_core.config import STAGES
    from tlcm_core.stages import REGISTRY

    assert tuple(REGISTRY) == STAGES
    for name, stage in REGISTRY.items():
        module = f"tlcm_core.stages.{name.replace('-', '_')}"
        assert stage.run.__module__ == module, f"{name}: its run lives in {stage.run.__module__}, not {module}"


# ------------------------------------------------------------------------------------------------ declared reads


def test_a_stage_reading_an_undeclared_config_field_fails_at_once():
    from tlcm_core.config import load_config
    from tlcm_core.stage import Stage, UndeclaredConfigRead, config_view

    cfg = load_config("toy-fast")
    stage = Stage("probe", 1, run=lambda ctx: {}, reads=("mlcd", "compute.seed"), uses=("lcd.log_every",))
    view = config_view(stage, cfg)
    assert view.mlcd.lr == cfg.mlcd.lr and view.compute.seed == cfg.compute.seed
    assert view.lcd.log_every == cfg.lcd.log_every and view.compute.device == cfg.compute.device  # always readable
    for read in (lambda: view.lcd.lr, lambda: view.compute.dtype, lambda: view.evaluate):
        with pytest.raises(UndeclaredConfigRead, match="does not list"):
            read()


def test_fingerprints_follow_the_declared_reads():
    from tlcm_core.config import load_config
    from tlcm_core.pipeline import plan

    stages = "stages=[teacher-trajectories,mlcd,lcd-trajectories,lcd,evaluate]"
    base = plan(load_config("toy-fast", [stages]))
    lr = plan(load_config("toy-fast", [stages, "mlcd.lr=2e-4"]))
    assert lr["teacher-trajectories"].fingerprint == base["teacher-trajectories"].fingerprint  # reused
    assert all(lr[s].fingerprint != base[s].fingerprint for s in ("mlcd", "lcd-trajectories", "lcd", "evaluate"))
    bookkeeping = plan(load_config("toy-fast", [stages, "mlcd.log_every=7", "mlcd.prefetch=1",
                                                "trajectories.batch_size=3", "compute.device=cpu"]))
    assert {s: p.fingerprint for s, p in bookkeeping.stages.items()} == \
        {s: p.fingerprint for s, p in base.stages.items()}
    evaluate_only = plan(load_config("toy-fast", [stages, "evaluate.num_samples=8"]))
    assert [s for s in base.stages if evaluate_only[s].fingerprint != base[s].fingerprint] == \
        ["teacher-evaluate", "evaluate"]  # the protocol: the teacher's rows too
    for student in ("evaluate.steps=[1,2]", "evaluate.sampler=multistep"):  # the student's alone
        changed = plan(load_config("toy-fast", [stages, student]))
        assert [s for s in base.stages if changed[s].fingerprint != base[s].fingerprint] == ["evaluate"], student


def test_fields_added_later_are_hashed_only_away_from_their_default():
    from tlcm_core.config import load_config
    from tlcm_core.pipeline import plan
    from tlcm_core.stage import HASHED_UNLESS_DEFAULT, _field_default, config_slice
    from tlcm_core.stages import REGISTRY

    stages = "stages=[teacher-trajectories,mlcd,lcd-trajectories,lcd,evaluate]"
    # each at its default (a typo would raise in _field_default); the toy presets set some of them
    defaults = [f"{p}={json.dumps(_field_default(p))}" for p in HASHED_UNLESS_DEFAULT]
    cfg = load_config("toy-fast", [stages] + defaults)
    for path in HASHED_UNLESS_DEFAULT:
        assert not any(path in config_slice(stage, cfg) for stage in REGISTRY.values())
    assert "compute.lora_forward" in config_slice(REGISTRY["mlcd"], load_config("toy-fast", [stages]))  # merged
    base = plan(cfg)
    bf16 = plan(load_config("toy-fast", [stages] + defaults + ["compute.cpu_dtype=bfloat16"]))
    assert all(bf16[s].fingerprint != base[s].fingerprint for s in base.stages)  # every stage samples or follows one


@pytest.mark.slow
def test_every_stage_reads_exactly_what_it_declares(tmp_path, monkeypatch):
    """All nine stages on a tiny toy run (latent LPIPS as MLCD's distance, every finetune term, every export
    format): no stage reads a config path it did not declare (the view would raise), and every declared read is
    used (a stale declaration would hash a setting that changes nothing)."""
    import tlcm_core.pipeline as pipeline
    from tlcm_core.config import STAGES, load_config
    from tlcm_core.progress import SilentReporter
    from tlcm_core.stage import config_view
    from tlcm_core.stages import REGISTRY

    seen: dict[str, set[str]] = {}
    monkeypatch.setattr(pipeline, "config_view", lambda stage, cfg: config_view(stage, cfg,
                                                                                seen.setdefault(stage.name, set())))
    cfg = load_config("toy-fast", [
        f"store.url={tmp_path}", f"stages=[{','.join(STAGES)}]", "trajectories.num_samples=64",
        "trajectories.shard_size=32", "mlcd.iterations=2", "mlcd.distance=latent-lpips", "latent_lpips.steps=2",
        "latent_lpips.num_pairs=32", "latent_lpips.batch_size=8", "latent_lpips.width=0.0625",
        "lcd_trajectories.num_samples=16", "lcd_trajectories.shard_size=16", "lcd.iterations=2", "lcd.distance=huber",
        "finetune.iterations=2", "finetune.batch_size=2", "finetune.q=1", "finetune.reward_weight=1",
        "finetune.dmd_weight=1", "finetune.gan_weight=0.1", "finetune.gan_real=teacher", "finetune.gan_real_pool=4",
        "finetune.gan_real_steps=2", "evaluate.steps=[1]", "evaluate.teacher_steps=[2]", "evaluate.num_samples=8",
        "evaluate.grid_size=0", "export.formats=[diffusers,kohya,peft]"])
    results = pipeline.run_pipeline(cfg, reporter=SilentReporter())
    assert [r.stage for r in results] == list(STAGES) and not any(r.cached for r in results)
    gpu_only = {"compute.dtype"}  # half precision and autocast apply on accelerators only
    unused = {name: [r for r in stage.reads_for(cfg) if r not in gpu_only
                     and not any(p == r or p.startswith(r + ".") for p in seen[name])]
              for name, stage in REGISTRY.items()}
    assert not {k: v for k, v in unused.items() if v}, f"declared reads never made: {unused}"


def test_the_docs_name_only_files_that_exist():
    """docs/ and the README point newcomers at files: each path they name must be there (renames update them)."""
    import re

    pattern = re.compile(r"(?:tlcm_core|tasks|flows|tests|bench|configs|deploy|scripts|docs)/[A-Za-z0-9_./-]+"
                         r"\.(?:py|yaml|md|sh|json)")
    texts = [p for p in (ROOT / "docs").glob("*.md")] + [ROOT / "README.md"]
    missing = sorted({f"{t.name}: {m}" for t in texts for m in pattern.findall(t.read_text())
                      if "/X." not in m and not (ROOT / m).exists()})
    assert not missing, missing
    sources = [p.read_text() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    cited = [n for n in ("DESIGN.md", "PAPER-NOTES", "STYLE.md") if any(n in s for s in sources)]
    assert not cited, f"code cites notes that are not in the repository: {cited}"


def test_a_folder_named_like_the_toy_world_is_a_path_not_the_shipped_teacher():
    from tlcm_core.config import TeacherConfig

    assert TeacherConfig(source="toy").toy_world == "toy"
    assert TeacherConfig(source="toy:toy-hard").toy_world == "toy-hard"
    for path in ("toy-teacher/pipeline", "toy_models/x", "./toy", "toy:"):
        assert TeacherConfig(source=path).toy_world is None, path
