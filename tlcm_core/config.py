"""Typed pipeline configuration: pydantic v2 models, YAML presets, `--set a.b=v` overrides.

A config is validated once, before any model is loaded; each stage's resolved slice of it is written into
the stage's artifact manifest and hashed into its fingerprint (see `tlcm_core.pipeline`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError

# Presets live in the repository's configs/ (the project is installed editable, also in the worker image).
PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"

# The stages in dependency order (docs/artifacts.md; each declared in tlcm_core/stages/<name>.py).
STAGES = (
    "teacher-trajectories",
    "latent-lpips",
    "mlcd",
    "lcd-trajectories",
    "lcd",
    "finetune",
    "teacher-evaluate",
    "evaluate",
    "export",
)

# The official TLCM LoRA target modules (docs/method.md, stage 1 settings).
OFFICIAL_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the field, the value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def toy_world(source: str) -> str | None:
    """The toy world a teacher or prompt source names ("toy", "toy:<world>" or, for a teacher, "toy:<world>/<kind>"),
    else None. A folder whose name merely starts with "toy" (say `toy-teacher/pipeline`) is a path, not the shipped
    toy teacher."""
    if source == "toy":
        return "toy"
    if source.startswith("toy:") and source[4:]:
        return source[4:].partition("/")[0]
    return None


def toy_teacher_kind(source: str) -> str:
    """Which of a toy world's shipped teachers a source names: "unet" (the SDXL-shaped one, `toy:<world>`) or
    "flow" (the SD3-shaped flow-matching one, `toy:<world>/flow`)."""
    return (source.partition("/")[2] or "unet") if toy_world(source) else "unet"


TOY_TEACHER_KINDS = ("unet", "flow")


class TeacherConfig(Section):
    # "toy" (the shipped toy world teacher), a hub id ("stabilityai/stable-diffusion-xl-base-1.0"),
    # or a local folder / fsspec URL holding a diffusers pipeline.
    source: str = "toy"
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" for the hub's half-precision weight files
    resolution: int = Field(32, ge=8, description="image side in pixels the teacher generates")
    # the model family (tlcm_core/families/): auto detects it from model_index.json's _class_name; name it for a hub
    # id whose model_index.json should not be fetched just to find out
    family: Literal["auto", "unet", "flux", "sd3"] = "auto"
    # T5 tokens per prompt for FLUX.1 / SD3 teachers (None: the pipeline's default, 512 / 256); SD/SDXL ignore it
    max_sequence_length: int | None = Field(None, ge=1, le=512)

    @field_validator("source")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("teacher.source must be 'toy', a hub id or a local path")
        if toy_world(v) is not None and toy_teacher_kind(v) not in TOY_TEACHER_KINDS:
            raise ValueError(f"teacher.source={v!r}: a toy teacher is 'toy:<world>' or 'toy:<world>/flow'")
        return v

    @property
    def toy_world(self) -> str | None:
        """The shipped toy world this teacher is (None for any other teacher)."""
        return toy_world(self.source)

    @property
    def toy_kind(self) -> str:
        """"unet" or "flow": which of the world's shipped teachers (only meaningful when toy_world is set)."""
        return toy_teacher_kind(self.source)


class ScheduleConfig(Section):
    num_train_timesteps: int = Field(1000, ge=10)
    segments: int = Field(8, ge=1, le=64, description="M, number of consistency segments")
    skip: int = Field(20, ge=1, description="t_hi - t_lo for MLCD (TLCM eq. 7)")
    guidance: float = Field(8.0, ge=0.0, description="teacher CFG scale w (eq. 8)")
    solver: Literal["ddim"] = "ddim"

    @model_validator(mode="after")
    def _skip_fits(self) -> ScheduleConfig:
        seg = self.num_train_timesteps // self.segments
        if self.skip > seg:
            raise ValueError(
                f"schedule.skip={self.skip} is larger than one segment ({self.num_train_timesteps}"
                f"/{self.segments}={seg} timesteps); use skip <= {seg} or fewer segments"
            )
        return self


class LoRAConfig(Section):
    rank: int = Field(64, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0)  # PEFT's default lora_alpha, as the official release
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # auto: the teacher family's list (tlcm_core/families/: the official release's for SD/SDXL UNets and FLUX.1,
    # attention and MLP of both streams for SD3); a list of module-name suffixes (PEFT style) wins, and one that
    # matches no module of the teacher's network is refused before training
    target_modules: Literal["auto"] | Annotated[list[str], Field(min_length=1)] = "auto"


class StoreConfig(Section):
    url: str = "./tlcm-artifacts"
    # s3fs options (endpoint_url, key, ...). Prefer the standard AWS_* environment variables for credentials:
    # anything written here ends up in the resolved config.
    storage_options: dict[str, Any] = Field(default_factory=dict)
    verify: Literal["size", "checksum"] = "checksum"

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("secret", "key", "token", "aws_secret_access_key", "aws_access_key_id"):
            if key in v:
                raise ValueError(
                    f"store.storage_options.{key}: credentials do not belong in a config (it is written into every "
                    "manifest); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment or a Prefect block"
                )
        return v


class ComputeConfig(Section):
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # training/inference autocast dtype on GPU
    # the frozen pipelines' weights on a CPU: the teacher and student sampling of the trajectory and evaluation stages
    # (training stays float32). bfloat16 samples ~1.8x faster on CPUs with AVX512-BF16 or AMX and slower on others
    # (a warning says so); half the weights' memory either way (README, "What each stage costs"). auto: bfloat16
    # where this CPU computes it natively, else float32; the fingerprints hash the dtype it resolves to, so a store
    # keeps the pairs of each apart
    cpu_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    seed: int = Field(0, ge=0)
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU; None keeps torch's")
    # training stages run data-parallel in this many processes (accelerate: one per GPU; gloo on CPU), each with its
    # own batch of the trainer's batch_size
    num_processes: int = Field(1, ge=1, le=64)
    # training on a CPU with num_processes 1: MLCD and LCD run data-parallel in this many processes, each with 1/N of
    # every batch: the same batches, so the same LoRA up to float rounding, N cores at work. torch's threads speed up
    # small layers such as the toy worlds' less (toy-hard's MLCD on 2-core CPUs: 2 threads 1.0-1.36x, 2 processes
    # 1.55-1.75x; bench/RESULTS.md). Their batch sizes must be multiples of it. Finetune stays in one process: its
    # draws are per micro-batch, so a split would change them. The trajectory stages (sharded) fill their missing
    # shards in this many local processes, each shard from its own seeds: the same pairs. Ignored on a GPU
    cpu_processes: int = Field(1, ge=1, le=64)
    # the trainers (mlcd, lcd, finetune) recompute each block's activations in the backward pass instead of keeping
    # them (diffusers' enable_gradient_checkpointing, through the teacher's family): less memory, ~1/3 more compute,
    # the same weights (bookkeeping: not in any fingerprint). FLUX.1-dev at 1024 px needs it (bench/RESULTS.md)
    gradient_checkpointing: bool = False
    # how a LoRA layer computes while a stage trains or samples with it (tlcm_core/lora.py, set_lora_forward):
    # "separate" is PEFT's (the base op, then the rank-r A and B ops on the input); "merged" is one op on the adapted
    # weight W + B A * alpha / r: the same function up to float rounding, without the A and B ops but with the
    # weight's full-size gradient. Merged is the faster where the rank is near the layers' width (toy-hard's MLCD
    # 1.7x as fast on a CPU: rank 64 on 32-96 channels); separate where it is far below (an SDXL layer at rank 64 runs
    # 1.7-3.3x slower merged, and its conv keeps a full-size copy of the adapted weight for the backward pass).
    # Under autocast (GPU training in bfloat16/float16) merged runs PEFT's forward
    lora_forward: Literal["separate", "merged"] = "separate"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "mps", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"compute.device={v!r}; allowed: auto, cpu, mps, cuda, cuda:N")
        return v


class TrajectoriesConfig(Section):
    # "toy" uses the toy world's prompt list; otherwise an fsspec URL/path to a UTF-8 text file, one prompt a line.
    prompts: str = "toy"
    num_samples: int = Field(4096, ge=1)
    shard_size: int = Field(256, ge=1, description="samples per shard = zarr chunk rows")
    batch_size: int = Field(64, ge=1)
    mds: bool = True  # Algorithm 1; False = a single teacher DDIM step from noise to t_hi (the paper's ablation)
    storage_dtype: Literal["float32", "float16"] = "float32"

    @model_validator(mode="after")
    def _shards(self) -> TrajectoriesConfig:
        if self.shard_size > self.num_samples:
            self.shard_size = self.num_samples
        return self


class TrainerConfig(Section):
    """What the one training loop (tlcm_core/training.py) reads, for every training stage."""

    iterations: int = Field(1000, ge=1)
    lr: float = Field(1e-4, gt=0, le=1.0)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)
    warmup: int = Field(0, ge=0)
    # > 0: the stage's LoRA is an exponential moving average of the student's weights over its steps (decay per
    # optimiser step; 0 = the last step's weights, as the paper)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(20, ge=1)


class ConsistencyConfig(TrainerConfig):
    """A trainer on cached pairs (MLCD, LCD): the loop's settings plus the distance and the pair reader's."""

    distance: Literal["mse", "huber", "latent-lpips"] = "mse"
    huber_c: float = Field(0.001, gt=0)
    prefetch: int = Field(4, ge=0, description="batches read ahead from the trajectory store")


class MLCDConfig(ConsistencyConfig):
    pass


class LCDTrajectoriesConfig(Section):
    num_samples: int = Field(2048, ge=1)
    shard_size: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    q: int = Field(4, ge=1, le=8, description="student sampler steps for clean latents (Algorithm 2)")
    p: int = Field(3, ge=1, le=4, description="teacher CFG-DDIM steps per milestone interval")
    renoise: Literal["same", "fresh"] = "same"  # Algorithm 2 re-noises with the same eps; "fresh" draws anew

    @model_validator(mode="after")
    def _shards(self) -> LCDTrajectoriesConfig:
        if self.shard_size > self.num_samples:
            self.shard_size = self.num_samples
        return self


class LCDConfig(ConsistencyConfig):
    iterations: int = Field(2000, ge=1)  # restating a field drops TrainerConfig's bounds: repeated here
    lr: float = Field(1e-5, gt=0, le=1.0)
    # where LCD compares the student's x0 with its target (docs/method.md "Stage 2"): "x0" is the paper's eq. 10
    # (every milestone weighs 1); "jump" compares both after the DDIM jump from x_hi to the next milestone, which
    # weighs a milestone's x0 error as the sampler's next state sees it (0.005 at t=999 .. 0.86 at t=124, as MLCD)
    compare: Literal["x0", "jump"] = "x0"
    # MLCD's loss (eq. 7) on the teacher's pairs, with this weight, added to every LCD step: keeps the student on the
    # teacher's trajectories while LCD ties the segments together. 0: LCD alone, as the paper
    mlcd_weight: float = Field(0.0, ge=0)
    # the anchor's batch of teacher pairs per step (None: lcd.batch_size); smaller is cheaper: each anchor pair costs
    # what an LCD pair costs (a student pass with grad, one without)
    anchor_batch_size: int | None = Field(None, ge=1)


# What a finetune phase (finetune.phases) may set: how long and how it trains, and which terms act with what weight.
# Everything else is built once for the stage and shared by its phases: the reward scorer, the fake score adapter's
# rank, the GAN's loss and real side, the student's q-step sampler, DMD's t range, logging and checkpointing.
PHASE_FIELDS = ("iterations", "lr", "batch_size", "grad_accum", "warmup", "ema_decay", "weight_decay", "max_grad_norm",
                "reward_weight", "reward_margin", "dmd_weight", "fake_score_lr", "fake_updates_per_step", "gan_weight",
                "discriminator_lr", "regression_weight")
TERM_WEIGHTS = ("reward_weight", "dmd_weight", "gan_weight", "regression_weight")


class FinetuneConfig(TrainerConfig):
    """Stage 3 (TLCM section 4.3): any subset of reward, distribution matching and adversarial losses on the one
    student LoRA; a weight of 0 disables a term. With `phases`, the stage runs them as consecutive phases."""

    iterations: int = Field(500, ge=1)  # restating a field drops TrainerConfig's bounds: repeated here
    lr: float = Field(1e-5, gt=0, le=1.0)
    q: int = Field(4, ge=1, le=8, description="student steps for the clean latents that eq. 9 re-noises")
    # where the student's training inputs come from: "renoised" is eq. 9 as the paper (the student's q-step sample,
    # re-noised at a random milestone); "sampler" trains on the very states the few-step sampler meets at inference
    # (DMD2's backward simulation): the `sampler_steps`-step TLCM sampler runs from noise without grad, and each
    # sample is the state at one of its milestones, drawn evenly (docs/method.md "Stage 3")
    inputs: Literal["renoised", "sampler"] = "renoised"
    sampler_steps: list[int] = Field(default_factory=lambda: [2, 4], description="step counts of the sampler whose "
                                     "states finetune.inputs=sampler trains on (one drawn per micro-batch)")
    sampler_grid: Literal["official", "sigma"] = "official"  # their milestones (as evaluate.milestone_grid)
    # preference reward, TLCM eq. 11: max(margin - s(x, c_pos), 0) + max(s(x, c_neg), 0)
    reward_weight: float = Field(0.0, ge=0)
    reward_margin: float = 16.0
    reward_scorer: Literal["toy", "open_clip", "mps"] = "toy"
    reward_model: str | None = None  # open_clip: "ARCH:path/to/weights"; mps: path to the published checkpoint
    allow_pickle: bool = False  # the MPS checkpoint is a pickled model: loading it runs code from the file
    # distribution matching (DMD, Yin et al. 2024), TLCM eq. 12; its loss is a mean over latent elements (as DMD2's),
    # so the weight does not depend on the resolution
    dmd_weight: float = Field(0.0, ge=0)
    fake_score_lr: float = Field(1e-5, gt=0)
    fake_updates_per_step: int = Field(1, ge=1)
    fake_rank: int = Field(16, ge=1)
    dmd_t_min: int = Field(20, ge=1)
    dmd_t_max: int = Field(980, ge=1)
    # the CFG scale of DMD's real score (None: schedule.guidance, the scale the teacher's pairs were made with, as
    # DMD/DMD2 use the teacher's own); a lower scale asks the student for the less mode-seeking guided distribution
    dmd_guidance: float | None = Field(None, ge=1.0)
    # adversarial, TLCM eq. 13: discriminator = the frozen teacher's features (a UNet's encoder half, a transformer's
    # image tokens part-way through: ModelFamily.discriminator_features) + small trainable heads
    gan_weight: float = Field(0.0, ge=0)
    gan_loss: Literal["non-saturating", "hinge"] = "non-saturating"
    gan_real: Literal["student-multistep", "teacher"] = "student-multistep"
    gan_real_pool: int = Field(256, ge=1, description="teacher samples cached for gan_real=teacher")
    gan_real_steps: int = Field(25, ge=1, description="steps of the teacher's baseline sampler for those samples "
                                "(DDIM + CFG; a flow teacher's Euler on its own grid)")
    discriminator_lr: float = Field(1e-4, gt=0)
    # paired regression (not in TLCM; DMD's regression loss, Yin et al. 2024 sec. 3.3): the MSE between the student's
    # x0 from pure noise x_T (the first step of every sampler) and the teacher's sample from the same x_T, by its
    # baseline sampler at regression_steps, over a pool of regression_pairs noises sampled once per run (kept in the
    # artifact). It pins the one-step prediction the few-step sampler starts from (docs/method.md "Stage 3")
    regression_weight: float = Field(0.0, ge=0)
    regression_pairs: int = Field(1024, ge=1, description="teacher samples (with their noises) the regression uses")
    regression_steps: int = Field(25, ge=1, description="steps of the teacher's baseline sampler for those samples")
    # Stage 3 as consecutive training runs on the one LoRA, in order (TLCM section 4.3 runs the MPS reward alone,
    # 500 iterations at batch 8, then DMD + GAN, 1000 at batch 4). Each phase is a mapping of some of PHASE_FIELDS
    # that replace this section's values for that phase; what a phase does not set it takes from the section:
    #   phases: [{iterations: 500, batch_size: 8, dmd_weight: 0, gan_weight: 0},
    #            {iterations: 1000, batch_size: 4, reward_weight: 0}]
    # Each phase starts fresh optimisers and learning-rate warmup (as separate runs would) and checkpoints under
    # checkpoints/phase-N/. [] (the default): one run of the section as it stands. Declared last: its check reads
    # the section's other (already validated) fields.
    phases: list[dict[str, Any]] = Field(default_factory=list, description="finetune phases, run in order "
                                         "(overrides of: " + ", ".join(PHASE_FIELDS) + ")")

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: list[dict[str, Any]], info) -> list[dict[str, Any]]:
        """Each phase: known, per-phase fields only, valid values, at least one term on. Returns the phases with
        their values as validated (YAML's `1e-5` is a string until then), so the fingerprint hashes numbers."""
        if not set(cls.model_fields) - {"phases"} <= set(info.data):
            return v  # another field of the section is invalid: that error is the one to read
        allowed = ", ".join(PHASE_FIELDS)
        out = []
        for i, phase in enumerate(v, 1):
            where = f"finetune.phases: phase {i}"
            if not phase:
                raise ValueError(f"{where} is empty; give it at least one of: {allowed}")
            for k in phase:
                if k not in PHASE_FIELDS:
                    why = "is shared by every phase (set it in the finetune section)" if k in cls.model_fields \
                        else "is not a finetune field"
                    raise ValueError(f"{where} sets {k!r}, which {why}; a phase may set: {allowed}")
            effective = _phase_config(cls, info.data, phase, where)
            if effective is None:  # the section's own cross-field check fails: its error is the one to read
                return v
            if not any(getattr(effective, w) for w in TERM_WEIGHTS):
                raise ValueError(f"{where} trains nothing: its {', '.join(TERM_WEIGHTS)} are all 0 (a phase "
                                 "takes those it does not set from the section); set one of them above 0")
            out.append({k: getattr(effective, k) for k in phase})
        return out

    @model_validator(mode="after")
    def _something_to_do(self) -> FinetuneConfig:
        if self.dmd_t_min >= self.dmd_t_max:
            raise ValueError(f"finetune.dmd_t_min={self.dmd_t_min} must be below dmd_t_max={self.dmd_t_max}")
        return self

    def phase_configs(self) -> list[FinetuneConfig]:
        """The settings each phase trains with: the section with the phase's overrides; without phases, [self]."""
        if not self.phases:
            return [self]
        base = self.model_dump(exclude={"phases"})
        return [FinetuneConfig.model_validate({**base, **phase}) for phase in self.phases]


def _phase_config(cls, base: dict[str, Any], phase: dict[str, Any], where: str) -> FinetuneConfig | None:
    """The section's validated fields with a phase's overrides, as a FinetuneConfig; a bad override is one line
    naming the phase, the field and the value. None when only the section's own cross-field check fails."""
    try:
        return cls.model_validate({**{k: v for k, v in base.items() if k != "phases"}, **phase})
    except ValidationError as e:
        err = next((x for x in e.errors() if x["loc"] and x["loc"][0] in phase), None)
        if err is None:
            return None
        field = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{where}: {field} = {err.get('input')!r}: {err['msg']}") from None


class MetricsConfig(Section):
    """The field's metrics (TLCM Table 1) for real teachers; weights are local paths, fsspec URLs (`hf://org/repo/file`
    for the hub) or open_clip tags. Toy worlds use the shipped toy evaluator unless kind=real."""

    kind: Literal["auto", "toy", "real", "none"] = "auto"  # auto: toy in a toy world, else real when captions is set
    # hpsv2 and pickscore are opt-in (each is a ViT-H-14 to download): add them to compare with papers that report them
    run: list[Literal["clip", "aesthetic", "imagereward", "fid", "hpsv2", "pickscore"]] = Field(
        default_factory=lambda: ["clip", "aesthetic", "imagereward", "fid"])
    # evaluation prompts: a text file (one caption a line) or COCO captions JSON (first caption per image, by image id)
    captions: str | None = None
    reference_images: str | None = None  # folder (any fsspec URL) of real images for FID, e.g. COCO-2017 val
    clip_model: str = "ViT-g-14"  # CLIP score: open_clip architecture (or local-dir:/hf-hub: model spec)
    clip_pretrained: str | None = "laion2b_s12b_b42k"  # open_clip tag, or a weights file path/URL
    aesthetic_clip_model: str = "ViT-L-14-quickgelu"  # LAION aesthetic predictor: OpenAI CLIP ViT-L/14 + the MLP
    aesthetic_clip_pretrained: str | None = "openai"
    aesthetic_weights: str = "sac+logos+ava1-l14-linearMSE.pth"  # path/URL; the file name is pinned
    imagereward_weights: str = "hf://THUDM/ImageReward/ImageReward.pt"
    imagereward_med_config: str = "hf://THUDM/ImageReward/med_config.json"
    imagereward_tokenizer: str = "bert-base-uncased"  # hub id or local folder of the BERT tokenizer
    # torch-fidelity's weights-inception-2015-12-05-6726825d.pth; None: look in torch.hub's checkpoint cache
    fid_inception_weights: str | None = None
    # FID's reference set: `images` = reference_images (real photos, Table 1), `teacher` = the teacher's own
    # fid_teacher_steps-step DDIM + CFG samples of the same prompts and noise (row key fid_teacher): how far a few-step
    # student is from its teacher, with no real images needed
    fid_reference: Literal["images", "teacher"] = "images"
    fid_teacher_steps: int = Field(25, ge=1, le=1000)
    # HPSv2: open_clip architecture + the HPSv2 checkpoint (path, fsspec URL; HPS_v2_compressed.pt is v2.0)
    hpsv2_model: str = "ViT-H-14"
    hpsv2_weights: str = "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"
    # PickScore: a transformers CLIPModel and the processor it was trained with (hub ids, local folders, fsspec URLs)
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    batch_size: int = Field(16, ge=1)


class EvaluateConfig(Section):
    steps: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 8])
    teacher_steps: list[int] = Field(default_factory=lambda: [25])
    num_samples: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    sampler: Literal["renoise", "multistep"] = "renoise"
    # which N of the M milestones an N-step sampler visits: the official release's index grid, or the milestones at
    # evenly spaced noise levels (sigma; what a flow teacher under a large shift wants: docs/flow-matching.md)
    milestone_grid: Literal["official", "sigma"] = "official"
    seed: int = Field(1234, ge=0)
    # the CFG scale of the teacher's baseline rows (None: schedule.guidance). Set it where the pipeline distils at
    # another scale than users sample the teacher with, so the student is compared with the teacher as it is used
    teacher_guidance: float | None = Field(None, ge=0.0)
    grid_size: int = Field(16, ge=0, description="images in the sample grid per step count (0: none)")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 1 <= s <= 64]
        if bad or not v:
            raise ValueError(f"evaluate.steps={v}: each step count must be in 1..64")
        return v


class ExportConfig(Section):
    # every format by default (with kohya comes comfyui/tlcm_workflow.json): users load the one their tool takes
    formats: list[Literal["diffusers", "kohya", "peft"]] = Field(default_factory=lambda: ["diffusers", "kohya", "peft"])
    sampler: Literal["renoise", "multistep"] = "renoise"  # the exported TLCMScheduler's sampler
    milestone_grid: Literal["official", "sigma"] = "official"  # ... and its milestone grid (as evaluate's)
    steps: int = Field(4, ge=1, le=64, description="step count the model card's usage snippet shows")
    # kohya key names: sgm (input_blocks_*, as kohya trains SDXL), diffusers (down_blocks_*, as for SD 1.x/2.x), auto
    kohya_naming: Literal["auto", "sgm", "diffusers"] = "auto"


class LatentLPIPSConfig(Section):
    """Latent LPIPS (VGG-16 on latents; docs/method.md): the distance `distance: latent-lpips` uses, and how the
    `latent-lpips` stage makes its weights."""

    # file: `weights` (the published latent-lpips.pth or a latent_lpips.safetensors; path or fsspec URL);
    # bapps: train on BAPPS 2AFC at `bapps_url` (latents from the teacher's VAE);
    # datafree: regress a pixel metric of VAE-decoded latent pairs built from the teacher-trajectories cache.
    source: Literal["file", "bapps", "datafree"] = "datafree"
    weights: str | None = None
    # root of the BAPPS 2AFC layout {root}/{train,val}/{subset}/{ref,p0,p1,judge}/; any fsspec URL, also chained
    # into an archive, e.g. "tar://2afc::https://host/twoafc.tar.gz". With source=file: optional, for a 2AFC report.
    bapps_url: str | None = None
    bapps_image_size: int | None = Field(None, ge=8, description="resize BAPPS patches before VAE encoding")
    max_triplets: int = Field(0, ge=0, description="BAPPS triplets read per split (0: all)")
    # auto: toy-features in the toy world (its evaluator's features), else lpips-vgg (needs torchvision's VGG-16
    # ImageNet weights in the torch hub cache)
    pixel_distance: Literal["auto", "lpips-vgg", "toy-features"] = "auto"
    width: float = Field(1.0, gt=0, le=4, description="channel multiplier; 1.0 = VGG-16 as in the paper")
    steps: int = Field(2000, ge=1)
    lr: float = Field(1e-4, gt=0, le=1.0)
    batch_size: int = Field(32, ge=1)
    num_pairs: int = Field(4096, ge=16, description="data-free: latent pairs labelled with the pixel metric")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share (data-free anchors; BAPPS without val/)")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _source_needs(self) -> LatentLPIPSConfig:
        if self.source == "file" and not self.weights:
            raise ValueError("latent_lpips.source=file needs latent_lpips.weights (a path or URL of latent-lpips.pth "
                             "or latent_lpips.safetensors)")
        if self.source == "bapps" and not self.bapps_url:
            raise ValueError("latent_lpips.source=bapps needs latent_lpips.bapps_url (the BAPPS 2AFC root)")
        return self


class PipelineConfig(Section):
    name: str = "custom"
    stages: list[str] = Field(default_factory=lambda: ["teacher-trajectories", "mlcd", "evaluate"])
    # local: every stage in this process; deployments: each stage as its own `tlcm/<stage>` deployment run
    dispatch: Literal["local", "deployments"] = "local"
    shard_runs: int = Field(1, ge=1, le=256, description="with dispatch=deployments: parallel shard runs of "
                            "teacher-trajectories and lcd-trajectories")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    trajectories: TrajectoriesConfig = Field(default_factory=TrajectoriesConfig)
    mlcd: MLCDConfig = Field(default_factory=MLCDConfig)
    lcd_trajectories: LCDTrajectoriesConfig = Field(default_factory=LCDTrajectoriesConfig)
    lcd: LCDConfig = Field(default_factory=LCDConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    latent_lpips: LatentLPIPSConfig = Field(default_factory=LatentLPIPSConfig)

    @model_validator(mode="after")
    def _steps_fit_milestones(self) -> PipelineConfig:
        for field, steps in (("evaluate.steps", self.evaluate.steps),
                             ("finetune.sampler_steps", self.finetune.sampler_steps)):
            if not steps or any(not 1 <= n <= self.schedule.segments for n in steps):
                raise ValueError(f"{field}={steps}: a TLCM sampler takes 1 to schedule.segments="
                                 f"{self.schedule.segments} steps (one per milestone); give at least one")
        return self

    @model_validator(mode="after")
    def _batches_split_over_cpu_processes(self) -> PipelineConfig:
        n = self.compute.cpu_processes
        if n == 1 or self.compute.num_processes > 1:
            return self
        for field, size in self.trainer_batch_sizes().items():
            if size % n:
                raise ValueError(f"compute.cpu_processes={n} splits MLCD's and LCD's batches across {n} processes, "
                                 f"but {field}={size} is not a multiple of {n}; make it one, or set "
                                 "compute.cpu_processes=1")
        return self

    def trainer_batch_sizes(self) -> dict[str, int]:
        """The batch sizes compute.cpu_processes splits, by config field: MLCD's and LCD's, when in `stages`."""
        out = {}
        if "mlcd" in self.stages:
            out["mlcd.batch_size"] = self.mlcd.batch_size
        if "lcd" in self.stages:
            out["lcd.batch_size"] = self.lcd.batch_size
            if self.lcd.mlcd_weight and self.lcd.anchor_batch_size is not None:
                out["lcd.anchor_batch_size"] = self.lcd.anchor_batch_size
        return out

    @model_validator(mode="after")
    def _finetune_has_a_loss(self) -> PipelineConfig:
        f = self.finetune  # with phases, each phase's own weights are checked (FinetuneConfig._phases)
        if "finetune" in self.stages and not f.phases and not any(getattr(f, w) for w in TERM_WEIGHTS):
            weights = ", ".join(f"finetune.{w}" for w in TERM_WEIGHTS)
            raise ValueError(f"stage 'finetune' has nothing to train: {weights} are all 0; set at least one of "
                             "them above 0 (e.g. --set finetune.dmd_weight=1) or remove finetune from stages")
        return self

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known stages: {', '.join(STAGES)}")
        # keep dependency order whatever order the user wrote
        return [s for s in STAGES if s in v]


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:  # one line: where, what the parser expected
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = "; ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) or str(e)
        raise ConfigError(f"{path}: malformed YAML{where}: {what}; fix the file's syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        parent = _resolve_source(str(base), relative_to=path.parent)
        return _deep_merge(_read_yaml(parent), data)
    return data


def _resolve_source(name_or_path: str, relative_to: Path | None = None) -> Path:
    candidate = Path(name_or_path)
    if relative_to is not None and not candidate.is_absolute() and (relative_to / candidate).is_file():
        return relative_to / candidate
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise ConfigError(f"config file {name_or_path!r} not found")
        return candidate
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"config {name_or_path!r} is neither a preset ({', '.join(preset_names())}) nor an existing YAML file"
    )


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`mlcd.lr=2e-4` -> (["mlcd", "lr"], 2e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value, e.g. mlcd.lr=2e-4")
    key, raw = item.split("=", 1)
    path = [p.replace("-", "_") for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[path[-1]] = value
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (value {e.get('input')!r}); check the spelling against configs/")
        elif e["type"] == "value_error":  # our validators' messages name the field, the value and the fix
            msg = str(e["ctx"]["error"]) if "error" in e.get("ctx", {}) else e["msg"]
            lines.append(f"  {msg}" if msg.startswith(loc.split(".")[0]) or not e["loc"] else f"  {loc}: {msg}")
        else:
            lines.append(f"  {loc} = {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(name_or_path: str = "toy", overrides: list[str] | None = None) -> PipelineConfig:
    """Load a preset name or YAML path, apply `section.field=value` overrides, validate."""
    path = _resolve_source(name_or_path)
    data = apply_overrides(_read_yaml(path), overrides)
    data.setdefault("name", path.stem)
    return validate_config(data, source=f"{path}" + (f" with overrides {overrides}" if overrides else ""))


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def resolve_config(config: str | dict[str, Any], store: str | None = None,
                   overrides: list[str] | None = None, dispatch: str | None = None) -> PipelineConfig:
    """A preset name, a YAML path, or an already-resolved config dict; then `store`, `--set` overrides and
    `dispatch` (later ones win). Used by the CLI (without Prefect) and by the `tlcm` flow."""
    extra = list(overrides or []) + ([f"store.url={store}"] if store else []) + \
        ([f"dispatch={dispatch}"] if dispatch else [])
    if isinstance(config, dict):
        return validate_config(apply_overrides(config, extra), source="flow parameter")
    return load_config(config, extra)
