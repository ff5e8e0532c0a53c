"""TLCMScheduler inside the diffusers pipeline reproduces tlcm_core's own sampler exactly (same noise, same math), and
`tlcm generate` writes PNGs from a LoRA whose metadata names its base model."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_lora import LORA, PROMPTS, fresh_pipe, pipeline_latents, reference_latents, trained_lora

from tlcm_core.generate import generate, read_lora
from tlcm_core.lora import LoRAError, load_lora_into, merge_lora, unmerge_lora
from tlcm_core.schedule import NoiseSchedule, milestones, sampler_timesteps
from tlcm_core.scheduler import TLCMScheduler

EXACT = dict(rtol=0.0, atol=0.0)


@pytest.fixture(scope="module")
def lora_pipe():
    pipe = fresh_pipe()
    load_lora_into(pipe.unet, trained_lora()[0], LORA)
    merge_lora(pipe.unet)  # as tlcm_pipeline and evaluate sample
    return pipe


def test_merged_lora_samples_what_the_adapter_samples():
    """Sampling folds the LoRA into the weights (one matmul per layer instead of three): same latents up to float
    rounding, every adapted layer merged, and unmerging gives the adapter back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = fresh_pipe()
    load_lora_into(pipe.unet, trained_lora()[0], LORA)
    base_w = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "base_layer" in n}
    unmerged = reference_latents(None, 4, seed=5, pipe=pipe)
    layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert merge_lora(pipe.unet) == len(layers) > 0 and all(m.merged for m in layers)
    assert merge_lora(pipe.unet) == 0  # idempotent
    merged = reference_latents(None, 4, seed=5, pipe=pipe)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    changed = [n for n, p in pipe.unet.named_parameters() if n in base_w and not torch.equal(p, base_w[n])]
    assert changed, "merging must change the base weights"
    unmerge_lora(pipe.unet)
    assert not any(m.merged for m in layers)
    for n, p in pipe.unet.named_parameters():
        if n in base_w:
            torch.testing.assert_close(p, base_w[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps,mode", [(1, "renoise"), (2, "renoise"), (4, "renoise"), (3, "multistep")])
def test_scheduler_in_pipeline_equals_tlcm_sample(lora_pipe, steps, mode):
    ref = reference_latents(None, steps, seed=3, mode=mode, pipe=lora_pipe)
    lora_pipe.scheduler = TLCMScheduler.from_base(lora_pipe.scheduler.config, sampler=mode)
    torch.testing.assert_close(pipeline_latents(lora_pipe, steps, seed=3), ref, **EXACT)


def test_scheduler_timesteps_and_config():
    for T, M in [(1000, 8), (1000, 4), (1000, 10), (500, 8)]:
        for n in range(1, M + 1):
            s = TLCMScheduler(num_train_timesteps=T, segments=M)
            s.set_timesteps(n)
            assert s.timesteps.tolist() == sampler_timesteps(n, milestones(T, M)), (T, M, n)
    s = TLCMScheduler()
    for n, ts in [(2, [999, 499]), (3, [999, 499, 124]), (4, [999, 749, 499, 124]), (8, list(range(999, 0, -125)))]:
        s.set_timesteps(n)
        assert s.timesteps.tolist() == ts
    with pytest.raises(ValueError, match="use 1..8 steps"):
        s.set_timesteps(9)
    s.set_timesteps(timesteps=[999, 600, 10])
    assert s.timesteps.tolist() == [999, 600, 10]
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[10, 600])
    with pytest.raises(ValueError, match="sampler"):
        TLCMScheduler(sampler="euler")
    # the noise schedule is the base model's, as tlcm_core.schedule.NoiseSchedule reads it
    base = dict(fresh_pipe().scheduler.config)
    assert torch.equal(TLCMScheduler.from_base(base).alphas_cumprod, NoiseSchedule.from_config(base).alphas_cumprod)


def test_scheduler_step_math_for_every_prediction_type(tmp_path):
    """One step against NoiseSchedule (v-prediction and x0 models too); save/load keeps the config."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for pred in ("epsilon", "v_prediction", "sample"):
        s = TLCMScheduler(prediction_type=pred, sampler="multistep")
        s.save_pretrained(tmp_path / pred)
        s = TLCMScheduler.from_pretrained(tmp_path / pred)
        assert (s.config.prediction_type, s.config.sampler) == (pred, "multistep")
        s.set_timesteps(2)
        ns = NoiseSchedule(s.alphas_cumprod, pred)
        x0, eps = ns.to_x0_eps(out, x, 999)
        step = s.step(out, 999, x)
        torch.testing.assert_close(step.denoised, x0, **EXACT)
        (a_t, s_t), (a_s, s_s) = ns.coeffs(999, x), ns.coeffs(499, x)
        torch.testing.assert_close(step.prev_sample, a_s * x0 + s_s * ((x - a_t * x0) / s_t), **EXACT)
        last = s.step(out, 499, step.prev_sample)
        torch.testing.assert_close(last.prev_sample, last.denoised, **EXACT)  # the last step returns x0


def test_generate_is_tlcm_sample_per_image(lora_pipe):
    """Image i uses seed + i whatever the batch: exactly what sampling it alone with tlcm_sample gives; in a batch of
    two, only the float rounding of batched CPU kernels differs (~3e-5 here)."""
    state, _ = trained_lora()
    pipe = _pipe()
    one = generate(None, state, PROMPTS, 2, seed=7, lora=LORA, output_type="latent", batch_size=1, pipe=pipe)
    two = generate(None, state, PROMPTS, 2, seed=7, lora=LORA, output_type="latent", batch_size=2, pipe=pipe)
    torch.testing.assert_close(two, one, rtol=1e-3, atol=1e-3)
    for i, p in enumerate(PROMPTS):
        ref = reference_latents(None, 2, seed=7 + i, prompts=[p], pipe=lora_pipe)
        torch.testing.assert_close(one[i:i + 1], ref, **EXACT)


def _pipe():
    from tiny_lora import teacher

    from tlcm_core.generate import tlcm_pipeline

    return tlcm_pipeline(teacher(), trained_lora()[0], LORA, device="cpu")


def test_generate_cli_writes_pngs(tmp_path):
    from flows.cli import main

    state, meta = trained_lora()
    save_file(state, tmp_path / "lora.safetensors", metadata=meta)
    # one prompt -> one PNG, upscaled for viewing (toy images are 32 px)
    assert main(["generate", "--lora", str(tmp_path / "lora.safetensors"), "--prompt", "a red circle", "--steps",
                 "2", "--seed", "0", "--out", str(tmp_path / "circle.png")]) == 0
    im = Image.open(tmp_path / "circle.png")
    assert im.format == "PNG" and im.size == (256, 256) and im.mode == "RGB"
    # it is the pipeline's image, nearest-upscaled
    ref = generate(None, state, ["a red circle"], 2, seed=0, lora=LORA, pipe=_pipe())[0]
    assert im.resize((32, 32), Image.NEAREST).tobytes() == ref.tobytes()
    # a prompts file -> a folder of PNGs and a grid; the artifact folder form of --lora
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    assert main(["generate", "--lora", str(tmp_path), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                 "--out", str(tmp_path / "out"), "--scale", "1"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["000-a-red-circle.png", "001-a-blue-square.png", "grid.png"]
    assert Image.open(tmp_path / "out" / "000-a-red-circle.png").size == (32, 32)


def test_generate_refuses_a_changed_base(tmp_path, capsys):
    from flows.cli import main

    state, meta = trained_lora()
    base = json.loads(meta["base_model"])
    # as a toy LoRA whose teacher was retrained since: the recorded content hash no longer matches
    meta = {**meta, "base_model": json.dumps({**base, "content": "0123456789abcdef"})}
    save_file(state, tmp_path / "lora.safetensors", metadata=meta)
    assert main(["generate", "--lora", str(tmp_path / "lora.safetensors"), "--prompt", "x", "--out",
                 str(tmp_path / "x.png")]) == 2  # a UserError: one `error:` line, exit 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "pass --base explicitly" in err and "Traceback" not in err
    assert main(["generate", "--lora", str(tmp_path / "lora.safetensors"), "--prompt", "x", "--steps", "1",
                 "--base", base["source"], "--out", str(tmp_path / "x.png")]) == 0
    with pytest.raises(LoRAError, match="no TLCM LoRA"):
        read_lora(str(tmp_path / "missing"))
