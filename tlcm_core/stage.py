"""What a stage is: one declaration next to its code, and the one signature every stage's run has.

A stage module (tlcm_core/stages/<name>.py) ends with `STAGE = Stage(...)`: its name, version, input stages,
the config it reads, its run function, whether it is sharded, whether it trains (data-parallel with
compute.num_processes), whether it makes a LoRA and whether the stages that take it as input imply it. Everything
else is derived from that declaration:

- the fingerprint hashes exactly the declared `reads` (minus the declared bookkeeping `uses`), the inputs'
  fingerprints and the version;
- the run sees the config through a `ConfigView` that refuses any section or field the stage did not declare,
  so the fingerprint cannot drift from what the code reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .config import PipelineConfig
from .errors import UserError
from .progress import Reporter

# Settings that never change a stage's output, readable by every stage and never hashed.
ALWAYS_READABLE = ("name", "store", "compute.device", "compute.num_threads")


class UndeclaredConfigRead(AttributeError):
    """A stage read a config field its declaration does not list (a bug in the stage, not the user's)."""


def _no_inputs(cfg: PipelineConfig) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    run: Callable[[StageContext], dict]
    # config paths that determine the output ("mlcd", "compute.seed"), hashed; or a function of the config giving
    # them, for a read that only some settings make (latent_lpips.weights when the distance is latent LPIPS)
    reads: tuple[str, ...] | Callable[[PipelineConfig], tuple[str, ...]]
    uses: tuple[str, ...] = ()  # config paths read for bookkeeping only ("mlcd.log_every"); never hashed
    inputs: Callable[[PipelineConfig], dict[str, str]] = _no_inputs  # input name -> upstream stage
    num_shards: Callable[[PipelineConfig], int] | None = None  # set for stages several workers fill at once
    trains: bool = False  # a training stage: runs data-parallel in compute.num_processes processes
    # a trainer whose batches compute.cpu_processes can split on a CPU without changing them (MLCD and LCD: a pair
    # batch's rows do not depend on the batch size); it reads compute.cpu_processes
    splits_on_cpu: bool = False
    makes_lora: bool = False
    # runs with the configured pipeline whenever a planned stage takes it as an input, listed in `stages` or not
    # (teacher-evaluate, for evaluate's teacher rows); `--stages` runs only what it names, as for every stage
    implied: bool = False

    @property
    def sharded(self) -> bool:
        return self.num_shards is not None

    def reads_for(self, cfg: PipelineConfig) -> tuple[str, ...]:
        return tuple(self.reads(cfg)) if callable(self.reads) else tuple(self.reads)


@dataclass
class StageContext:
    """What a stage's run gets: the config (as a view of its declared reads), its input artifacts by name, the
    artifact to fill, where to report, the shards to compute (sharded stages; None = all, then commit) and the
    accelerator when it runs as one of several data-parallel processes."""

    cfg: PipelineConfig
    inputs: dict[str, Any]
    out: Any
    reporter: Reporter
    shards: list[int] | None = None
    accelerator: Any = None


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprint slices derived from the declaration


def _derived(cfg: PipelineConfig, path: str) -> Any:
    """Values hashed in place of a raw config field (the paths in DERIVED): what identifies the teacher's weights,
    the prompt list's content rather than its location, the CPU sampling dtype `auto` resolves to, and the LoRA's
    target modules as attach_lora resolves them (`auto` is the family's list where the family is known without
    fetching anything, so a UNet teacher's fingerprints are those of the explicit list that was the default before
    `auto`; else `auto` itself)."""
    if path == "teacher":
        from .models import teacher_identity

        return teacher_identity(cfg.teacher)
    if path == "compute.cpu_dtype":  # `auto` as this machine resolves it: the dtype the pairs were sampled in
        from .models import cpu_dtype_name

        return cpu_dtype_name(cfg.compute)
    if path == "lora.target_modules":
        from .models import local_family

        family = local_family(cfg.teacher) if cfg.lora.target_modules == "auto" else None
        return list(family.lora_target_modules) if family is not None else _dump(cfg, path)
    from .prompts import load_prompts, prompts_digest

    return prompts_digest(load_prompts(cfg.trajectories.prompts))


def _dump(cfg: PipelineConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if hasattr(node, "model_dump") else node


DERIVED = ("teacher", "trajectories.prompts", "lora.target_modules", "compute.cpu_dtype")

# Fields added after artifacts were made without them: hashed only when set away from their default (which must be
# the behaviour from before the field), so adding a field keeps every fingerprint a config at its default had.
HASHED_UNLESS_DEFAULT = ("compute.cpu_dtype", "compute.cpu_processes", "compute.lora_forward", "mlcd.ema_decay",
                         "lcd.ema_decay", "finetune.ema_decay", "finetune.regression_weight",
                         "finetune.regression_pairs", "finetune.regression_steps", "evaluate.teacher_guidance")


def _field_default(path: str) -> Any:
    model: Any = PipelineConfig
    *sections, leaf = path.split(".")
    for part in sections:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf].get_default(call_default_factory=True)


def config_slice(stage: Stage, cfg: PipelineConfig, derived: dict[str, Any] | None = None) -> dict[str, Any]:
    """The part of the config that determines the stage's output: its declared reads (derived values in place of
    the fields they stand for, also inside a declared section), less its bookkeeping uses. `derived` keeps the
    derived values between the stages of one plan (the toy teacher's identity hashes its files)."""
    derived = {} if derived is None else derived

    def value_of(path: str) -> Any:
        if path not in derived:
            derived[path] = _derived(cfg, path)
        v = derived[path]
        return dict(v) if isinstance(v, dict) else v  # each slice its own dict: `uses` below may pop from it

    # left out, read alone or in a section; a derived field by its derived value (cpu_dtype auto resolved to float32
    # hashes as float32 does: not at all)
    at_default = tuple(f for f in HASHED_UNLESS_DEFAULT
                       if (value_of(f) if f in DERIVED else _dump(cfg, f)) == _field_default(f))
    out: dict[str, Any] = {}
    for path in stage.reads_for(cfg):
        if path in at_default:
            continue
        value = value_of(path) if path in DERIVED else _dump(cfg, path)
        for d in DERIVED:  # e.g. reads=("trajectories",): hash the prompts' digest, not the file's location
            if d.startswith(path + "."):
                value[d[len(path) + 1:]] = value_of(d)
        if isinstance(value, dict):
            for field in stage.uses + at_default:
                if field.startswith(path + "."):
                    value.pop(field[len(path) + 1:], None)
        out[path] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The config as a stage sees it


class ConfigView:
    """Attribute access to a config limited to declared paths: a declared section is returned as is, a section of
    which only some fields are declared as a view of those fields, anything else raises UndeclaredConfigRead."""

    def __init__(self, target: Any, allowed: tuple[str, ...], stage: str, prefix: str = "",
                 seen: set[str] | None = None):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_seen", seen)  # when given, collects every path read (tests/test_layout.py)

    def __getattr__(self, name: str) -> Any:
        path = self._prefix + name
        value = getattr(self._target, name)
        if any(path == a or path.startswith(a + ".") for a in self._allowed):
            if self._seen is not None:
                self._seen.add(path)
            return value
        if any(a.startswith(path + ".") for a in self._allowed):
            return ConfigView(value, self._allowed, self._stage, path + ".", self._seen)
        raise UndeclaredConfigRead(
            f"stage {self._stage!r} read config field {path!r}, which its Stage declaration does not list; add it to "
            "`reads` (if it changes the output) or `uses` (bookkeeping) in the stage's module")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a stage's config is read-only")


def config_view(stage: Stage, cfg: PipelineConfig, seen: set[str] | None = None) -> PipelineConfig:
    allowed = stage.reads_for(cfg) + tuple(stage.uses) + ALWAYS_READABLE
    return ConfigView(cfg, allowed, stage.name, seen=seen)  # type: ignore[return-value]


class StageInputError(UserError, RuntimeError):
    """An input artifact a stage needs is not there (or not complete)."""
