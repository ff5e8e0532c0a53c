"""HPSv2, PickScore and FID against the teacher's own samples (tlcm_core/metrics.py), and other methods' few-step LoRAs
in `tlcm eval` (tlcm_core/evaluation.py: ForeignLoRA, SchedulerSampler) -- on tiny random models built offline.

Each score is checked against an independent computation written here with plain torch (or the model's own forward)
on the same tiny model; the foreign-LoRA sampler against the stock diffusers pipeline with the same LoRA file,
scheduler, embeddings, latents and generator; the CLI on the shipped toy teacher (toy-fast)."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_metrics import TinyFeatures  # noqa: E402 - the same fast FID feature stand-in

from tlcm_core.config import MetricsConfig, load_config
from tlcm_core.metrics import (HPSV2_SIZE, MetricsError, RealMetrics, hpsv2_preprocess, pickscore_preprocess,
                               to_pil)

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a photo of a red square"]


def _pil(h: int, w: int, seed: int) -> Image.Image:
    arr = (torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


# ---------------------------------------------------------------------------------------------------------------------
# HPSv2


def _open_clip_cfg(image_size: int) -> dict:
    return {"embed_dim": 16,
            "vision_cfg": {"image_size": image_size, "layers": 1, "width": 32, "patch_size": image_size // 4,
                           "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _open_clip_model(image_size: int, seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(**_open_clip_cfg(image_size)).eval()


def _open_clip_dir(path: Path, image_size: int, seed: int) -> str:
    """A tiny open_clip model folder (local-dir:), what hpsv2_model names in place of ViT-H-14."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": _open_clip_cfg(image_size)}))
    save_file({k: v.contiguous() for k, v in _open_clip_model(image_size, seed).state_dict().items()},
              str(path / "open_clip_model.safetensors"))
    return f"local-dir:{path}"


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    """The architecture folder (seed 1) and an HPSv2 checkpoint in the released layout ({"state_dict": ...}) with
    other weights (seed 2), plus the model those weights make."""
    root = tmp_path_factory.mktemp("hps")
    arch = _open_clip_dir(root / "arch", HPSV2_SIZE, 1)
    fine_tuned = _open_clip_model(HPSV2_SIZE, 2)
    torch.save({"state_dict": fine_tuned.state_dict()}, root / "HPS_v2.1_compressed.pt")
    return {"hpsv2_model": arch, "hpsv2_weights": str(root / "HPS_v2.1_compressed.pt"), "model": fine_tuned,
            "root": root}


def _hps_reference(model, pil: list, prompts: list[str]) -> torch.Tensor:
    """HPSv2 by hand: ToTensor, bicubic (antialiased) resize of the longest side to 224, zero padding to a centred
    224 x 224, OpenAI mean/std; 100 x cosine of open_clip's embeddings."""
    import open_clip

    xs = []
    for im in pil:
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        h, w = x.shape[2:]
        nh, nw = round(h * 224 / max(h, w)), round(w * 224 / max(h, w))
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        canvas = torch.zeros(1, 3, 224, 224)
        top, left = (224 - nh) // 2, (224 - nw) // 2
        canvas[:, :, top:top + nh, left:left + nw] = x
        xs.append((canvas - MEAN[:, None, None]) / STD[:, None, None])
    with torch.no_grad():
        img = model.encode_image(torch.cat(xs))
        txt = model.encode_text(open_clip.tokenize(prompts))
    return 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1)


def test_hpsv2_is_100_cos_of_the_checkpoint_with_hpsv2_preprocessing(hps):
    cfg = MetricsConfig(kind="real", run=["hpsv2"], hpsv2_model=hps["hpsv2_model"], hpsv2_weights=hps["hpsv2_weights"],
                        batch_size=2)
    m = RealMetrics(cfg)
    scorer = m.scorers["hpsv2"]
    # landscape (padded rows), square, portrait, and one larger than 224 (downscaled: the antialiasing shows)
    pil = [_pil(24, 40, 0), _pil(64, 64, 1), _pil(50, 30, 2), _pil(260, 300, 3)]
    prompts = PROMPTS
    expected = _hps_reference(hps["model"], pil, prompts)
    torch.testing.assert_close(scorer(pil, prompts), expected, rtol=1e-4, atol=1e-3)
    # the weights are the HPSv2 file's, not the architecture folder's
    assert (_hps_reference(_open_clip_model(HPSV2_SIZE, 1), pil, prompts) - expected).abs().max() > 1e-2
    # padding is zeros before normalisation, centred with the smaller half first (40x24 -> 224x134: 45 + 45 rows)
    x = hpsv2_preprocess(pil[0])
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[:, :45], ((0 - MEAN) / STD)[:, None, None].expand(3, 45, 224))
    assert (x[:, 45] - (0 - MEAN[:, None]) / STD[:, None]).abs().max() > 1e-3
    # a row is the mean over its images
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    row = m(images, PROMPTS)
    assert set(row) == {"hpsv2"}
    assert row["hpsv2"] == pytest.approx(float(_hps_reference(hps["model"], to_pil(images), PROMPTS).mean()), abs=1e-3)


def test_hpsv2_refusals(hps, tmp_path):
    small = _open_clip_dir(tmp_path / "small", 32, 1)
    with pytest.raises(MetricsError, match=r"takes \(32, 32\) px images, but HPSv2 is pinned to 224 x 224"):
        RealMetrics(MetricsConfig(run=["hpsv2"], hpsv2_model=small, hpsv2_weights=hps["hpsv2_weights"]))
    with pytest.raises(MetricsError, match="Download HPS_v2.1_compressed.pt .* xswu/HPSv2 .*hpsv2_weights=/path"):
        RealMetrics(MetricsConfig(run=["hpsv2"], hpsv2_model=hps["hpsv2_model"],
                                  hpsv2_weights=str(tmp_path / "HPS_v2.1_compressed.pt")))
    other = tmp_path / "other.pt"  # a checkpoint of another architecture (the 32 px model)
    torch.save({"state_dict": _open_clip_model(32, 3).state_dict()}, other)
    with pytest.raises(MetricsError, match="not an HPSv2 checkpoint for open_clip"):
        RealMetrics(MetricsConfig(run=["hpsv2"], hpsv2_model=hps["hpsv2_model"], hpsv2_weights=str(other)))
    pickled = tmp_path / "pickled.pt"  # anything beyond plain tensors and containers is not unpickled
    torch.save({"state_dict": hps["model"].state_dict(), "args": functools.partial(print)}, pickled)
    with pytest.raises(MetricsError, match="weights_only=True"):
        RealMetrics(MetricsConfig(run=["hpsv2"], hpsv2_model=hps["hpsv2_model"], hpsv2_weights=str(pickled)))


# ---------------------------------------------------------------------------------------------------------------------
# PickScore


def _pickscore_dirs(root: Path, image_size: int = 224, crop: int = 224) -> dict:
    """A tiny transformers CLIPModel (logit scale 50, not CLIP's init) and a CLIP processor with the toy tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tlcm_core.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(image_size=image_size, patch_size=image_size // 4, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    model.save_pretrained(root / "model")
    CLIPProcessor(image_processor=CLIPImageProcessor(crop_size={"height": crop, "width": crop}), tokenizer=tok
                  ).save_pretrained(root / "processor")
    return {"pickscore_model": str(root / "model"), "pickscore_processor": str(root / "processor")}


@pytest.fixture(scope="module")
def pick(tmp_path_factory):
    return _pickscore_dirs(tmp_path_factory.mktemp("pick"))


def test_pickscore_is_logit_scale_times_cos_with_its_processor(pick):
    from transformers import CLIPModel, CLIPProcessor

    try:  # the PIL path of CLIP's image processor (transformers 5 names it ...Pil; in 4.x it is CLIPImageProcessor)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as PilProcessor
    except ImportError:  # pragma: no cover - transformers 4
        from transformers import CLIPImageProcessor as PilProcessor

    m = RealMetrics(MetricsConfig(kind="real", run=["pickscore"], batch_size=3, **pick))
    scorer = m.scorers["pickscore"]
    # landscape and portrait whose resized long side is 227 (crop offset 1.5: floor, as the processor), square, large
    pil = [_pil(70, 71, 5), _pil(64, 64, 6), _pil(71, 70, 7), _pil(260, 300, 8)]
    ours = torch.stack([pickscore_preprocess(im) for im in pil])
    # the pinned preprocessing is the reference processor's (PIL bicubic shortest side, centre crop, CLIP mean/std)
    theirs = PilProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})(
        images=pil, return_tensors="pt").pixel_values
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the score: the model's own forward (logits_per_image = exp(logit_scale) x cos), its diagonal
    model, processor = CLIPModel.from_pretrained(pick["pickscore_model"]).eval(), CLIPProcessor.from_pretrained(
        pick["pickscore_processor"])
    t = processor.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=theirs).logits_per_image
    got = scorer(pil, PROMPTS)
    torch.testing.assert_close(got, logits.diagonal(), rtol=1e-4, atol=1e-4)
    assert got.abs().max() > 0.5  # exp(logit_scale) = 50 multiplies cosines of random embeddings
    assert not torch.allclose(got, scorer(pil, PROMPTS[::-1]))  # depends on the caption
    row = m(torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(8)), PROMPTS[:3])
    assert set(row) == {"pickscore"} and math.isfinite(row["pickscore"])


def test_pickscore_refusals(pick, tmp_path):
    small = _pickscore_dirs(tmp_path / "small", image_size=32)
    with pytest.raises(MetricsError, match=r"takes 32 px images, but PickScore is pinned to 224 x 224"):
        RealMetrics(MetricsConfig(run=["pickscore"], pickscore_model=small["pickscore_model"],
                                  pickscore_processor=pick["pickscore_processor"]))
    wide = _pickscore_dirs(tmp_path / "wide", crop=336)
    with pytest.raises(MetricsError, match=r"pickscore_processor=.*crop_size.*not PickScore's pinned preprocessing"):
        RealMetrics(MetricsConfig(run=["pickscore"], pickscore_model=pick["pickscore_model"],
                                  pickscore_processor=wide["pickscore_processor"]))
    with pytest.raises(MetricsError, match="yuvalkirstain/PickScore_v1 .*pickscore_model / pickscore_processor"):
        RealMetrics(MetricsConfig(run=["pickscore"], pickscore_model=str(tmp_path / "missing"),
                                  pickscore_processor=pick["pickscore_processor"]))


# ---------------------------------------------------------------------------------------------------------------------
# FID against the teacher's samples


def test_fid_against_the_teacher_images():
    cfg = MetricsConfig(kind="real", run=["fid"], fid_reference="teacher", batch_size=4)  # no reference_images
    m = RealMetrics(cfg, fid_feature=TinyFeatures())
    teacher = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(MetricsError, match="0 reference image.*fid_reference=teacher"):
        m(teacher, ["x"] * 8)
    m.update_reference(teacher)
    same = m(teacher, ["x"] * 8)
    assert set(same) == {"fid_teacher"} and abs(same["fid_teacher"]) < 1e-3
    shifted = m(teacher * 0.5 + 0.3, ["x"] * 8)["fid_teacher"]
    further = m(teacher * 0.2 + 0.7, ["x"] * 8)["fid_teacher"]
    assert 1e-3 < shifted < further
    assert m.fid.num_reference == 8  # reset between rows keeps the reference
    with pytest.raises(MetricsError, match="or measure against the teacher's own samples with "
                                           "evaluate.metrics.fid_reference=teacher"):
        RealMetrics(MetricsConfig(run=["fid"]), fid_feature=TinyFeatures())


def test_evaluate_rows_reuse_the_teacher_row_as_fid_reference(tmp_path, monkeypatch):
    """fid_reference=teacher: the teacher's 25-step row is sampled once, first, and is FID's reference for every row
    (its own fid_teacher is ~0); no reference images are read."""
    from tiny_lora import base_path, trained_lora

    import tlcm_core.metrics as metrics_mod
    from tlcm_core.evaluation import Sampler, evaluate_rows
    from tlcm_core.progress import SilentReporter

    (tmp_path / "captions.txt").write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.setattr(metrics_mod, "RealMetrics", functools.partial(RealMetrics, fid_feature=TinyFeatures()))
    sampled = []
    batches = Sampler.batches

    def spy(self, steps, *a, **k):
        sampled.append((self.student, steps))
        yield from batches(self, steps, *a, **k)

    monkeypatch.setattr(Sampler, "batches", spy)
    cfg = load_config("toy-fast", [f"teacher.source={base_path()}", "lora.rank=4", "lora.alpha=8",
                                   "evaluate.num_samples=6", "evaluate.batch_size=3", "evaluate.grid_size=0",
                                   "evaluate.metrics.kind=real", "evaluate.metrics.run=[fid]",
                                   f"evaluate.metrics.captions={tmp_path / 'captions.txt'}",
                                   "evaluate.metrics.fid_reference=teacher"])
    rows = evaluate_rows(cfg, trained_lora()[0], [2], SilentReporter(), include_teacher_steps=[2, 25])
    assert [(r["method"], r["steps"]) for r in rows] == [("teacher-ddim-cfg", 25), ("teacher-ddim-cfg", 2),
                                                         ("tlcm-renoise", 2)]
    assert sampled == [(False, 25), (False, 2), (True, 2)]  # the reference is the 25-step row's images, not resampled
    assert all("fid" not in r for r in rows)
    assert abs(rows[0]["fid_teacher"]) < 1e-3 < rows[1]["fid_teacher"] and rows[2]["fid_teacher"] > 1e-3
    # not asked for as a row, the reference is still sampled (first) and reported
    sampled.clear()
    rows = evaluate_rows(cfg, trained_lora()[0], [2], SilentReporter())
    assert [(r["method"], r["steps"]) for r in rows] == [("teacher-ddim-cfg", 25), ("tlcm-renoise", 2)]
    assert sampled == [(False, 25), (True, 2)]


# ---------------------------------------------------------------------------------------------------------------------
# Other methods' few-step LoRAs: the stock diffusers scheduler each ships


def _diffusers_lora(unet, out: Path, seed: int, std: float = 0.1, rank: int = 4) -> str:
    """A diffusers-format LoRA for this UNet as diffusers' training scripts save it (random lora_B, alpha = rank)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="made")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="made"))
    unet.delete_adapters("made")
    StableDiffusionXLPipeline.save_lora_weights(str(out), unet_lora_layers=state, safe_serialization=True)
    return str(out / "pytorch_lora_weights.safetensors")


def _tiny_cfg(*extra: str):
    from tiny_lora import base_path

    return load_config("toy-fast", [f"teacher.source={base_path()}", "lora.rank=4", "lora.alpha=8", *extra])


def _stock_pipeline_latents(pipe, scheduler: str, cond, x_T, steps: int, seed: int) -> torch.Tensor:
    """The reference: diffusers' own SDXL pipeline call with the scheduler the method's model card sets."""
    from diffusers import LCMScheduler, TCDScheduler

    cls = {"lcm": LCMScheduler, "tcd": TCDScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    extra = {"eta": 0.3} if scheduler == "tcd" else {}  # TCD's model card; the pipeline's own default is 0
    return pipe(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled, latents=x_T.clone(),
                num_inference_steps=steps, guidance_scale=0.0, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **extra).images


@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_foreign_lora_samples_as_the_stock_diffusers_pipeline(scheduler, tmp_path):
    from tiny_lora import fresh_pipe

    from tlcm_core.evaluation import ForeignLoRA, SchedulerSampler, eval_lora, eval_noise, make_sampler

    path = _diffusers_lora(fresh_pipe().unet, tmp_path, seed=1)
    cfg = _tiny_cfg()
    lora = eval_lora(path, cfg, scheduler=scheduler)  # auto: no tlcm-lora/1 metadata -> diffusers' loader
    assert isinstance(lora, ForeignLoRA) and lora.tlcm is None and lora.method == f"lora-{scheduler}"
    sampler = make_sampler(cfg, fresh_pipe(), lora)
    assert isinstance(sampler, SchedulerSampler)
    x_T, cond = eval_noise(2, sampler.shape, 5), sampler.cond[torch.arange(2)]
    got = sampler.latents(2, x_T, cond, torch.Generator().manual_seed(9))
    ref_pipe = fresh_pipe()
    ref_pipe.load_lora_weights(str(tmp_path), adapter_name="ref")
    ref = _stock_pipeline_latents(ref_pipe, scheduler, cond, x_T, 2, 9)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the LoRA changes the samples: the same pipeline call with it disabled
    ref_pipe.disable_lora()
    assert (_stock_pipeline_latents(ref_pipe, scheduler, cond, x_T, 2, 9) - got).abs().max() > 1e-2
    # streamed rows decode what `latents` makes, batch by batch, with the same noise as every other row
    images, prompts, _ = sampler.sample(2, 2, 5, 2)
    assert images.shape == (2, 3, 32, 32) and prompts == sampler.prompts[:2]


def test_tlcm_lora_through_a_stock_scheduler_equals_its_exports_through_diffusers(tmp_path):
    """Our LoRA (alpha 8, rank 4: scale 2) with --scheduler lcm: loaded by our loader, by diffusers from the exported
    diffusers file (alpha folded) and from the exported kohya file (alpha key) -- the same latents."""
    from safetensors.torch import save_file
    from tiny_lora import fresh_pipe, teacher, trained_lora

    from tlcm_core.evaluation import ForeignLoRA, eval_lora, eval_noise, make_sampler
    from tlcm_core.lora import LoRAError
    from tlcm_core.lora_files import base_configs, export_files, write_files

    state, meta = trained_lora()
    save_file(state, str(tmp_path / "lora.safetensors"), metadata=meta)
    write_files(export_files(state, meta, ["diffusers", "kohya"], *base_configs(teacher()), segments=8),
                str(tmp_path / "export"))
    cfg = _tiny_cfg()
    assert isinstance(eval_lora(str(tmp_path / "lora.safetensors"), cfg), dict)  # --scheduler tlcm: the student rows
    ours = eval_lora(str(tmp_path / "lora.safetensors"), cfg, scheduler="lcm")
    assert isinstance(ours, ForeignLoRA) and ours.tlcm is not None and ours.method == "tlcm-lcm"
    via_diffusers = eval_lora(str(tmp_path / "export" / "diffusers"), cfg, fmt="diffusers", scheduler="lcm")
    kohya = eval_lora(str(tmp_path / "export" / "kohya" / "tlcm_lora.safetensors"), cfg, scheduler="lcm")
    assert via_diffusers.tlcm is None and kohya.tlcm is None
    x_T = eval_noise(2, (4, 16, 16), 3)
    out = []
    for lora in (ours, via_diffusers, kohya):
        sampler = make_sampler(cfg, fresh_pipe(), lora)
        out.append(sampler.latents(2, x_T, sampler.cond[torch.arange(2)], torch.Generator().manual_seed(4)))
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2], out[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(LoRAError, match=r"alpha 8 != rank 4, which diffusers' loader would drop"):
        eval_lora(str(tmp_path / "lora.safetensors"), cfg, fmt="diffusers", scheduler="lcm")
    with pytest.raises(LoRAError, match="--guidance 2: the TLCM sampler has no CFG"):
        eval_lora(str(tmp_path / "lora.safetensors"), cfg, guidance=2.0)


# ---------------------------------------------------------------------------------------------------------------------
# `tlcm eval --lora OTHER --scheduler ...` on the shipped toy teacher


@pytest.fixture(scope="module")
def toy_loras(tmp_path_factory):
    """diffusers-format LoRAs for the shipped toy teacher's UNet: random, all-zero (= no LoRA), and one of the wrong
    shape (every lora_A made for 7 input features)."""
    from safetensors.torch import load_file, save_file

    from tlcm_core.models import load_unet

    root = tmp_path_factory.mktemp("toy-loras")
    unet = load_unet(load_config("toy-fast").teacher, torch.device("cpu"))
    good = _diffusers_lora(unet, root / "good", seed=2, std=0.2)
    zero = _diffusers_lora(unet, root / "zero", seed=2, std=0.0)
    wrong = {k: (torch.randn(v.shape[0], 7) if "lora.down" in k or "lora_A" in k else v)
             for k, v in load_file(good).items()}
    save_file(wrong, str(root / "wrong.safetensors"))
    return {"good": good, "zero": zero, "wrong": str(root / "wrong.safetensors")}


EVAL = ["eval", "--config", "toy-fast", "--samples", "16", "--set", "evaluate.batch_size=16",
        "--set", "evaluate.grid_size=0"]


def _tlcm(argv: list[str], capfd) -> tuple[int, str, str]:
    from flows.cli import main

    rc = main(argv)
    out, err = capfd.readouterr()
    return rc, out, err


def test_cli_eval_other_lora_lcm_table(toy_loras, capfd):
    rc, out, err = _tlcm([*EVAL, "--lora", toy_loras["good"], "--scheduler", "lcm", "--steps", "1,2",
                          "--teacher-steps", "2"], capfd)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("| method | steps | prompt_accuracy |") and "seconds_per_image" in lines[0]
    assert [ln.split("|")[1:3] for ln in lines[2:]] == [[" teacher-ddim-cfg ", " 2 "], [" lora-lcm ", " 1 "],
                                                        [" lora-lcm ", " 2 "]]


def test_cli_eval_other_lora_tcd_json_and_the_lora_matters(toy_loras, capfd):
    runs = {}
    for name in ("good", "zero"):
        rc, out, err = _tlcm([*EVAL, "--lora", toy_loras[name], "--scheduler", "tcd", "--steps", "2", "--json"], capfd)
        assert rc == 0, err
        runs[name] = json.loads(out)
    assert [(r["method"], r["steps"], r["samples"]) for r in runs["good"]] == [("lora-tcd", 2, 16)]
    good, zero = runs["good"][0], runs["zero"][0]
    assert {"prompt_accuracy", "frechet", "seconds_per_image"} <= set(good)
    # same prompts, noise and seeds: only the LoRA differs (the all-zero one samples the bare teacher)
    assert (good["frechet"], good["prompt_accuracy"]) != (zero["frechet"], zero["prompt_accuracy"])


def test_cli_eval_other_lora_errors_are_one_line(toy_loras, capfd):
    rc, out, err = _tlcm([*EVAL, "--lora", toy_loras["wrong"], "--scheduler", "lcm", "--steps", "1"], capfd)
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err
    assert err.startswith(f"error: {toy_loras['wrong']}: does not fit the teacher's UNet (") and "size mismatch" in err
    rc, _, err = _tlcm([*EVAL, "--lora", toy_loras["good"], "--steps", "1"], capfd)  # which scheduler?
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "is not a TLCM LoRA (no tlcm-lora/1 metadata): say which scheduler" in err and "--scheduler lcm" in err
    rc, _, err = _tlcm([*EVAL, "--lora", "none", "--scheduler", "tcd", "--steps", "1"], capfd)
    assert rc == 2 and err.strip() == ("error: --scheduler: only with --lora FILE (the teacher's rows are DDIM + CFG "
                                       "with evaluate.teacher_guidance, else schedule.guidance)")
