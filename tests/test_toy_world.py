"""The toy world: data, tokenizer, shipped teacher pipeline, evaluator, teacher training + resume."""

from __future__ import annotations

import json

import pytest
import torch

torch.set_num_threads(1)

from diffusers import StableDiffusionXLPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from tlcm_core.toy import (  # noqa: E402
    TOY_ASSETS,
    ToyEvaluator,
    ToyTeacherSettings,
    build_tokenizer,
    frechet_distance,
    get_world,
    toy_teacher_path,
    train_toy_teacher,
)
from tlcm_core.toy.metrics import ddim_trailing_scheduler  # noqa: E402


@pytest.fixture(scope="module")
def evaluator() -> ToyEvaluator:
    return ToyEvaluator.load("toy")


# ------------------------------------------------------------------------------------------ data


def test_world_prompts_and_parse():
    w = get_world("toy")
    ps = w.prompts()
    assert len(ps) == 16 and len(set(ps)) == 16
    assert ps[0] == "a red circle" and ps[-1] == "a yellow cross"  # frozen order
    assert w.parse_prompt("a blue triangle") == {"color": 2, "shape": 2}
    for i, p in enumerate(ps):
        lab = w.parse_prompt(p)
        assert w.prompts()[lab["color"] * 4 + lab["shape"]] == p
    with pytest.raises(ValueError, match="not a prompt of world"):
        w.parse_prompt("a purple zebra")
    with pytest.raises(ValueError):
        get_world("no-such-world")


def test_data_deterministic_and_balanced():
    w = get_world("toy")
    x1, p1 = w.sample(160, seed=3)
    x2, p2 = w.sample(160, seed=3)
    x3, p3 = w.sample(160, seed=4)
    assert x1.shape == (160, 3, 32, 32) and x1.dtype == torch.float32
    assert float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0
    assert torch.equal(x1, x2) and p1 == p2
    assert not torch.equal(x1, x3) and p1 != p3
    counts = {p: p1.count(p) for p in w.prompts()}
    assert set(counts.values()) == {10}
    # images carry their colour: the brightest-channel statistics differ by prompt colour
    lab = w.labels(p1)
    red = x1[lab[:, 0] == 0]
    blue = x1[lab[:, 0] == 2]
    assert (red[:, 0] - red[:, 2]).amax(dim=(1, 2)).min() > 0.3
    assert (blue[:, 2] - blue[:, 0]).amax(dim=(1, 2)).min() > 0.3


def test_data_is_fast():
    import time

    t0 = time.time()
    get_world("toy").sample(4096, seed=0)
    assert time.time() - t0 < 5.0


# ------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip(tmp_path):
    tok = build_tokenizer()
    assert tok.model_max_length == 77
    ids = tok("a yellow triangle", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert tok.convert_ids_to_tokens(ids[:5]) == [
        "<|startoftext|>", "a</w>", "yellow</w>", "triangle</w>", "<|endoftext|>"
    ]
    # unknown words still tokenize (byte fallback), nothing maps to an unknown id silently
    odd = tok("a zebra!").input_ids
    assert len(odd) > 4
    tok.save_pretrained(tmp_path / "tok")
    tok2 = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    for text in ["a red circle", "", "A GREEN cross", "a zebra!"]:
        assert tok2(text).input_ids == tok(text).input_ids
    assert tok2.model_max_length == 77


# ------------------------------------------------------------------------------ shipped teacher


def test_shipped_pipeline_loads_and_generates():
    path = toy_teacher_path("toy")
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    sc = pipe.scheduler.config
    assert (sc.beta_schedule, sc.beta_start, sc.beta_end, sc.num_train_timesteps, sc.prediction_type) == (
        "scaled_linear", 0.00085, 0.012, 1000, "epsilon"
    )
    assert pipe.config.force_zeros_for_empty_prompt is False
    assert pipe.unet.config.addition_embed_type == "text_time"
    names = [n for n, _ in pipe.unet.named_modules()]
    for target in ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]:
        assert any(n.endswith(target) for n in names), target
    # the unconditional is the encoded empty prompt (what the teacher was trained with), not zeros
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt("a red circle", do_classifier_free_guidance=True)
        ue, _, upooled, _ = pipe.encode_prompt("", do_classifier_free_guidance=False)
    assert pe.shape == (1, 77, pipe.unet.config.cross_attention_dim)
    assert torch.equal(npe, ue) and torch.equal(npooled, upooled) and float(npe.abs().sum()) > 0
    assert not torch.allclose(pe, npe)
    pipe.scheduler = ddim_trailing_scheduler()
    out = pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all() and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float(out.std()) > 0.02  # not a blank image
    # shipped metadata
    metrics = json.loads((TOY_ASSETS / "toy" / "metrics.json").read_text())
    assert metrics["teacher"]["steps"]["25"]["accuracy"] >= 0.9
    assert ToyTeacherSettings(**json.loads((TOY_ASSETS / "toy" / "teacher_settings.json").read_text()))


# ------------------------------------------------------------------------------------ evaluator


def test_evaluator_real_vs_noise(evaluator):
    w = get_world("toy")
    x, p = w.sample(512, seed=12345)
    acc = evaluator.attribute_accuracy(x, p)
    assert acc["color"] >= 0.98 and acc["shape"] >= 0.98 and acc["all"] >= 0.98
    assert evaluator.correct(x, p).float().mean() >= 0.98
    noise = torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert evaluator.correct(noise, p).float().mean() < 0.2
    lg = evaluator.logits(x[:4])
    assert set(lg) == {"color", "shape"} and lg["color"].shape == (4, 4)
    f = evaluator.features(x[:4])
    assert f.shape[0] == 4 and 64 <= f.shape[1] <= 128
    assert not evaluator.training


def test_reward_is_differentiable(evaluator):
    w = get_world("toy")
    x, p = w.sample(16, seed=7)
    x = x.clone().requires_grad_(True)
    r = evaluator.reward(x, p)
    assert r.shape == (16,) and (r <= 0).all()
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    # the right prompt scores higher than a wrong one
    wrong = [w.prompts()[(w.prompts().index(q) + 5) % 16] for q in p]
    with torch.no_grad():
        assert (evaluator.reward(x, p) > evaluator.reward(x, wrong)).float().mean() > 0.9


def test_frechet_distance(evaluator):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)
    w = get_world("toy")
    real_a, _ = w.sample(256, seed=1)
    real_b, _ = w.sample(256, seed=2)
    noise = torch.rand(256, 3, 32, 32, generator=g)
    fd_real = frechet_distance(evaluator.features(real_a), evaluator.features(real_b))
    fd_noise = frechet_distance(evaluator.features(noise), evaluator.features(real_b))
    assert fd_noise > 5 * fd_real


# ----------------------------------------------------------------------------- teacher training


class _Stop(Exception):
    pass


def _tiny_settings(**kw) -> ToyTeacherSettings:
    base = dict(n_train=64, vae_steps=3, vae_batch_size=8, unet_steps=6, unet_batch_size=8, warmup_steps=2,
                scale_samples=64, checkpoint_every=2, log_every=1)
    base.update(kw)
    return ToyTeacherSettings(**base)


def test_train_toy_teacher_interrupt_and_resume(tmp_path):
    s = _tiny_settings()
    seen: list[tuple[str, int]] = []

    def stop_at_unet_3(phase, step, total, metrics):
        seen.append((phase, step))
        if phase == "unet" and step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train_toy_teacher(s, tmp_path / "run", progress=stop_at_unet_3)
    assert seen == [("vae", 1), ("vae", 2), ("vae", 3), ("unet", 1), ("unet", 2), ("unet", 3)]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert "unet-0000002" in ckpts and "vae-0000003" in ckpts
    state = torch.load(tmp_path / "run" / "checkpoints" / "unet-0000002" / "state.pt", weights_only=True)
    assert int(state["step"]) == 2
    assert not (tmp_path / "run" / "pipeline").exists()

    resumed: list[tuple[str, int]] = []
    out = train_toy_teacher(s, tmp_path / "run", progress=lambda ph, st, tot, m: resumed.append((ph, st)))
    # the VAE is not retrained and the UNet continues after its checkpoint (step 3), not from 1
    assert resumed == [("unet", 3), ("unet", 4), ("unet", 5), ("unet", 6)]
    assert (out / "model_index.json").exists()

    # resuming reproduces the uninterrupted run exactly (RNG + optimizer state are checkpointed)
    ref = train_toy_teacher(s, tmp_path / "ref", progress=lambda *a: None)
    w_res = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    w_ref = load_file(str(ref / "unet" / "diffusion_pytorch_model.safetensors"))
    assert w_res.keys() == w_ref.keys()
    assert all(torch.equal(w_res[k], w_ref[k]) for k in w_ref)

    # a finished run is a no-op; the result is a loadable SDXL pipeline
    calls: list = []
    assert train_toy_teacher(s, tmp_path / "run", progress=lambda *a: calls.append(a)) == out
    assert calls == []
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor != 1.0
    assert json.loads((tmp_path / "run" / "settings.json").read_text()) == s.model_dump(mode="json")


def test_teacher_settings_forbid_extra():
    with pytest.raises(Exception):
        ToyTeacherSettings(no_such_field=1)
