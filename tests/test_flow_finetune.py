"""Stage 3 and the teacher's baseline on flow teachers (tiny FLUX.1-dev- and SD3.5-shaped pipelines from
tests/tiny_flow.py): the discriminator reads the transformer's own hidden states; each loss trains only what it
should; the fake score model learns the velocity; the teacher's baseline is its stock pipeline's Euler sampling bit
for bit; gradient checkpointing recomputes blocks with the adapters of the forward pass, so it changes no gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_flow import MAX_SEQ, PROMPTS, RES, tiny_flux, tiny_sd3

from tlcm_core.config import LoRAConfig
from tlcm_core.families import family_of
from tlcm_core.families.flux import pack_latents, unpack_latents
from tlcm_core.lora import ADAPTER, attach_lora
from tlcm_core.models import encode_prompts, teacher_denoiser, teacher_grid
from tlcm_core.samplers import teacher_sample
from tlcm_core.stages.finetune import (FAKE, TokenDiscriminatorHeads, discriminate, discriminator_heads, dmd_gradient,
                                       dmd_loss, fake_score_backward, gan_discriminator_loss, gan_generator_loss)

BUILD = {"flux": tiny_flux, "sd3": tiny_sd3}


def _setup(name: str):
    """A tiny teacher whose transformer holds a student and a fake score adapter (B initialised away from 0: a
    trained-looking state, so that every adapter changes the output)."""
    pipe = BUILD[name]()
    net = pipe.transformer
    attach_lora(net, LoRAConfig(rank=4, alpha=4))
    attach_lora(net, LoRAConfig(rank=4, alpha=4), adapter_name=FAKE)
    net.set_adapter(ADAPTER)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    cond, uncond = encode_prompts(pipe, PROMPTS, RES, max_sequence_length=MAX_SEQ)
    return pipe, net, teacher_denoiser(pipe, RES), cond, uncond


def _grads(net, heads=None) -> dict[str, bool]:
    out = {"student": False, "fake": False, "base": False, "heads": False}
    for n, p in net.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            out["student" if f".{ADAPTER}." in n else "fake" if f".{FAKE}." in n else "base"] = True
    if heads is not None:
        out["heads"] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    return out


@pytest.mark.parametrize("name", ["flux", "sd3"])
@torch.no_grad()
def test_the_discriminator_reads_the_teachers_own_hidden_states(name):
    """The features are the image tokens the network itself computes after the double-stream blocks (FLUX) or the
    first half of the joint blocks (SD3), with every adapter off, laid out on the patch grid."""
    pipe, net, model, cond, _ = _setup(name)
    blocks = net.transformer_blocks
    last = blocks[-1] if name == "flux" else blocks[max(1, len(blocks) // 2) - 1]
    seen = {}
    hook = last.register_forward_hook(lambda m, i, o: seen.update(image=o[1]))
    x, t = torch.randn(2, 4, RES // 2, RES // 2), torch.tensor([100, 900])
    family = family_of(net)
    try:
        net.disable_adapters()
        family.forward(net, x, t, cond, model.schedule)
    finally:
        net.enable_adapters()
        hook.remove()
    heads = TokenDiscriminatorHeads(family.discriminator_channels(net.config))
    captured = []
    heads.register_forward_pre_hook(lambda m, args: captured.append(args[0]) and None)
    discriminate(net, heads, x, t, cond, model.schedule)
    p = 2  # both tiny transformers see 2x2 patches of the 16x16 latents
    grid = seen["image"].transpose(1, 2).reshape(2, -1, RES // 2 // p, RES // 2 // p)
    torch.testing.assert_close(captured[0], grid, rtol=0, atol=0)
    assert isinstance(discriminator_heads(net), TokenDiscriminatorHeads)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_each_stage3_loss_trains_only_what_it_should(name):
    pipe, net, model, cond, uncond = _setup(name)
    heads = discriminator_heads(net)
    z = torch.randn(2, 4, RES // 2, RES // 2)
    x0, _ = model(z, torch.tensor([499, 999]), cond)
    g = dmd_gradient(model, net, x0, torch.tensor([200, 600]), torch.randn_like(z), cond, uncond, 3.5)
    lg = gan_generator_loss(discriminate(net, heads, x0, torch.tensor([100, 100]), cond, model.schedule),
                            "non-saturating")
    loss = dmd_loss(x0, g) + lg
    assert torch.isfinite(loss) and torch.isfinite(g).all() and g.abs().sum() > 0
    loss.backward()
    got = _grads(net, heads)
    assert got["student"] and not got["fake"] and not got["base"]
    net.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    lf = fake_score_backward(model, net, x0.detach(), cond, torch.Generator().manual_seed(0))
    got = _grads(net)
    assert torch.isfinite(lf) and got["fake"] and not got["student"] and not got["base"]
    net.zero_grad(set_to_none=True)
    ld = gan_discriminator_loss(discriminate(net, heads, z, torch.tensor([3, 500]), cond, model.schedule),
                                discriminate(net, heads, x0.detach(), torch.tensor([3, 500]), cond, model.schedule),
                                "hinge")
    ld.backward()
    got = _grads(net, heads)
    assert torch.isfinite(ld) and got["heads"] and not got["student"] and not got["fake"] and not got["base"]


@torch.no_grad()
def test_the_fake_score_model_of_a_flow_teacher_learns_the_velocity():
    """Its loss is the rectified-flow loss: the MSE of the fake adapter's raw output (the velocity) against
    eps - x0, at the t and noise its generator draws."""
    pipe, net, model, cond, _ = _setup("flux")
    x0 = torch.randn(2, 4, RES // 2, RES // 2)
    with torch.enable_grad():
        loss = fake_score_backward(model, net, x0, cond, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, model.schedule.T, (2,), generator=g)
    n = torch.randn(x0.shape, generator=g)
    net.set_adapter(FAKE)
    try:
        v = family_of(net).forward(net, model.schedule.add_noise(x0, n, t), t, cond, model.schedule)
    finally:
        net.set_adapter(ADAPTER)
    torch.testing.assert_close(loss, F.mse_loss(v, n - x0), rtol=1e-5, atol=1e-6)


def _stock_latents(pipe, name: str, x_T, cond, uncond, steps: int, w: float) -> torch.Tensor:
    """The stock pipeline's own sampling from x_T with our conditioning (output_type="latent")."""
    kw = dict(num_inference_steps=steps, guidance_scale=w, height=RES, width=RES, output_type="latent",
              prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled)
    if name == "flux":
        out = pipe(latents=pack_latents(x_T), max_sequence_length=MAX_SEQ, **kw).images
        return unpack_latents(out, RES // 2, RES // 2)
    n = len(cond)
    return pipe(latents=x_T, negative_prompt_embeds=uncond.prompt_embeds.expand(n, -1, -1),
                negative_pooled_prompt_embeds=uncond.pooled.expand(n, -1), max_sequence_length=MAX_SEQ, **kw).images


@pytest.mark.parametrize("name, w", [("flux", 3.5), ("sd3", 3.0), ("sd3", 1.0)])
@torch.no_grad()
def test_the_teachers_baseline_is_its_stock_pipelines_euler_sampling(name, w):
    """The teacher's rows and the GAN's real pool sample a flow teacher as its stock pipeline does: Euler on the
    scheduler's shifted sigma grid (FLUX.1: linspace(1, 1/N, N) shifted by the resolution's mu; SD3: its own
    set_timesteps(N)), with FLUX.1-dev's guidance embedding or SD3's CFG (none at w = 1): the same latents, bit for
    bit, and the timesteps the stock scheduler visited."""
    pipe = BUILD[name]()
    cond, uncond = encode_prompts(pipe, PROMPTS, RES, max_sequence_length=MAX_SEQ)
    x_T = torch.randn(2, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(5))
    for steps in (1, 3):
        grid = teacher_grid(pipe, RES, steps)
        ours = teacher_sample(teacher_denoiser(pipe, RES), x_T, steps, cond, uncond, w, grid)
        stock = _stock_latents(pipe, name, x_T, cond, uncond, steps, w)
        assert torch.equal(ours, stock), (steps, (ours - stock).abs().max())
        assert torch.equal(grid.timesteps, pipe.scheduler.timesteps) and grid.sigmas[0] == 1.0
        assert grid.sigmas[-1] == 0 and len(grid.sigmas) == steps + 1


def test_a_unet_teacher_keeps_ddim_on_trailing_timesteps():
    from tlcm_core.toy.pipeline import build_toy_pipeline

    pipe = build_toy_pipeline(seed=4)
    assert teacher_grid(pipe, 32, 4) is None
    assert isinstance(discriminator_heads(pipe.unet), torch.nn.Module)
    assert not isinstance(discriminator_heads(pipe.unet), TokenDiscriminatorHeads)


# -- gradient checkpointing ------------------------------------------------------------------------------------------


def _generator_step_grads(name: str, checkpoint) -> dict[str, torch.Tensor]:
    """The student's gradient of stage 3's student terms (the GAN's generator loss through the discriminator, run
    with every adapter off, then DMD), with `checkpoint` None (plain), "family" (compute.gradient_checkpointing) or
    "plain-torch" (diffusers' default checkpoint function)."""
    pipe, net, model, cond, uncond = _setup(name)
    torch.manual_seed(1)
    heads = discriminator_heads(net)
    net.train()
    if checkpoint == "family":
        family_of(net).enable_gradient_checkpointing(net)
    elif checkpoint == "plain-torch":
        net.enable_gradient_checkpointing()
    z = torch.randn(2, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(2))
    x0, _ = model(z, torch.tensor([499, 999]), cond)
    logits = discriminate(net, heads, x0, torch.tensor([100, 700]), cond, model.schedule)
    (gan_generator_loss(logits, "non-saturating") + dmd_loss(x0, torch.ones_like(x0))).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_gradient_checkpointing_recomputes_with_the_forward_passes_adapters(name):
    """compute.gradient_checkpointing changes no gradient of the student: the discriminator's blocks (adapters off
    in the forward pass) are recomputed with the adapters off, though the backward pass runs after they are back on.
    diffusers' plain checkpoint recomputes them with the student's adapter on, another network, which torch notices
    (the recomputation saves other tensors) and fails the backward pass."""
    plain = _generator_step_grads(name, None)
    ours = _generator_step_grads(name, "family")
    assert plain.keys() == ours.keys() and plain
    for k in plain:
        torch.testing.assert_close(ours[k], plain[k], rtol=1e-5, atol=1e-7)
    from torch.utils.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="Recomputed values"):
        _generator_step_grads(name, "plain-torch")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """The toy UNet teacher and the tiny FLUX.1-dev saved as folders (teacher.source)."""
    from tlcm_core.toy.pipeline import build_toy_pipeline

    root = tmp_path_factory.mktemp("teachers")
    build_toy_pipeline(seed=4).save_pretrained(root / "unet")
    tiny_flux().save_pretrained(root / "flux")
    return root


def _trained(teachers, name: str, store, checkpointing: bool):
    from tlcm_core.config import load_config
    from tlcm_core.pipeline import open_store, run_pipeline
    from tlcm_core.progress import SilentReporter

    flow = [f"teacher.max_sequence_length={MAX_SEQ}", "schedule.guidance=3.5"] if name == "flux" else []
    cfg = load_config("toy-fast", [
        f"teacher.source={teachers / name}", f"store.url={store}", "stages=[teacher-trajectories,mlcd,finetune]",
        *flow, f"compute.gradient_checkpointing={str(checkpointing).lower()}", "trajectories.num_samples=16",
        "trajectories.shard_size=16", "mlcd.iterations=2", "mlcd.batch_size=4", "lora.rank=4",
        "finetune.iterations=2", "finetune.batch_size=2", "finetune.q=1", "finetune.reward_weight=0",
        "finetune.dmd_weight=1", "finetune.gan_weight=0.1"])
    res = run_pipeline(cfg, reporter=SilentReporter())
    store = open_store(cfg)
    return res, {s: store.artifact(s, r.fingerprint).load_tensors("lora.safetensors")
                 for s, r in zip(("mlcd", "finetune"), res[1:])}


@pytest.mark.parametrize("name", ["unet", "flux"])
def test_compute_gradient_checkpointing_is_applied_and_trains_the_same_lora(teachers, tmp_path, monkeypatch, name):
    """compute.gradient_checkpointing=true: MLCD's and stage 3's network recompute their blocks (through the
    family's checkpoint function), the stages train, and the LoRAs equal those of the run without it (it is
    bookkeeping: the fingerprints are the same)."""
    import tlcm_core.families.base as base

    calls = []
    real = base.adapter_faithful_checkpoint
    monkeypatch.setattr(base, "adapter_faithful_checkpoint",
                        lambda m, *a: calls.append(type(m).__name__) or real(m, *a))
    res_on, on = _trained(teachers, name, tmp_path / "on", True)
    assert calls and all(torch.isfinite(v).all() for v in on["finetune"].values())
    n_on = len(calls)
    res_off, off = _trained(teachers, name, tmp_path / "off", False)
    assert len(calls) == n_on  # nothing is checkpointed without the option
    assert [r.fingerprint for r in res_on] == [r.fingerprint for r in res_off]
    for stage in ("mlcd", "finetune"):
        assert on[stage].keys() == off[stage].keys()
        for k in on[stage]:
            torch.testing.assert_close(on[stage][k], off[stage][k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(on["finetune"][k], on["mlcd"][k]) for k in on["mlcd"])  # stage 3 trained
