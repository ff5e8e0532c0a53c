"""Stage 3 losses on a tiny SDXL-shaped UNet: finite, gradients only where they should be, DMD's fixed point,
the hinge margins; the finetune stage end to end with every term on; and its phases (finetune.phases)."""

import json

import pytest
import torch
from conftest import RecordingReporter

from tlcm_core.config import LoRAConfig, TeacherConfig, load_config
from tlcm_core.stages.finetune import (FAKE, DiscriminatorHeads, discriminate, dmd_gradient, dmd_loss, fake_score_backward,
                                gan_discriminator_loss, gan_generator_loss)
from tlcm_core.families.unet import unet_encoder
from tlcm_core.lora import ADAPTER, adapters_disabled, attach_lora
from tlcm_core.models import Denoiser, encode_prompts, load_pipeline
from tlcm_core.pipeline import open_store, run_pipeline
from tlcm_core.progress import SilentReporter
from tlcm_core.rewards import negative_prompts, reward_hinge
from tlcm_core.models import schedule_of


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tlcm_core.toy.pipeline import build_toy_pipeline

    path = tmp_path_factory.mktemp("t") / "tiny"
    build_toy_pipeline(seed=4).save_pretrained(path)
    return path


@pytest.fixture()
def setup(tiny_dir):
    pipe = load_pipeline(TeacherConfig(source=str(tiny_dir), resolution=32), torch.device("cpu"))
    unet = pipe.unet
    attach_lora(unet, LoRAConfig(rank=4, alpha=4))
    attach_lora(unet, LoRAConfig(rank=4, alpha=4), adapter_name=FAKE)
    unet.set_adapter(ADAPTER)
    cond, uncond = encode_prompts(pipe, ["a red circle", "a blue square"], 32)
    return pipe, unet, Denoiser(unet, schedule_of(pipe)), cond, uncond


def _grads(unet, heads=None):
    out = {"student": False, "fake": False, "base": False, "heads": False}
    for n, p in unet.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            out["student" if f".{ADAPTER}." in n else "fake" if f".{FAKE}." in n else "base"] = True
    if heads is not None:
        out["heads"] = any(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    return out


def test_reward_hinge_margins():
    s_pos = torch.tensor([20.0, 10.0, 16.0], requires_grad=True)
    s_neg = torch.tensor([-1.0, 3.0, 0.0], requires_grad=True)
    loss = reward_hinge(s_pos, s_neg, 16.0)
    assert loss.tolist() == [0.0, 6.0 + 3.0, 0.0]  # above the margin / below zero: nothing to gain
    loss.sum().backward()
    assert s_pos.grad.tolist() == [0.0, -1.0, 0.0] and s_neg.grad.tolist() == [0.0, 1.0, 0.0]
    neg = negative_prompts(["a", "b", "a"], ["a", "b", "c"], torch.Generator().manual_seed(0))
    assert all(n != p for n, p in zip(neg, ["a", "b", "a"]))


def test_dmd_gradient_is_zero_when_fake_and_real_agree(setup):
    pipe, unet, model, cond, uncond = setup
    x0 = torch.randn(2, 4, 16, 16, requires_grad=True)
    t, n = torch.tensor([300, 700]), torch.randn(2, 4, 16, 16)
    # fresh fake LoRA (B = 0) == teacher, and w = 1 (no CFG): the two scores agree exactly
    g = dmd_gradient(model, unet, x0, t, n, cond, uncond, 1.0)
    assert torch.equal(g, torch.zeros_like(g))
    g8 = dmd_gradient(model, unet, x0, t, n, cond, uncond, 8.0)
    assert torch.isfinite(g8).all() and g8.abs().sum() > 0
    loss = dmd_loss(x0, g8)
    loss.backward()
    torch.testing.assert_close(x0.grad, g8 / g8.numel())  # d/dx0 of the surrogate: the DMD gradient, mean-reduced


def test_student_terms_reach_only_the_student_lora(setup):
    pipe, unet, model, cond, uncond = setup
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)  # a trained-looking state
    heads = DiscriminatorHeads(unet.config.block_out_channels[-1])
    z = torch.randn(2, 4, 16, 16)
    t = torch.tensor([499, 999])
    x0, _ = model(z, t, cond)
    g = dmd_gradient(model, unet, x0, torch.tensor([200, 600]), torch.randn_like(z), cond, uncond, 8.0)
    lg = gan_generator_loss(discriminate(unet, heads, x0, torch.tensor([100, 100]), cond), "non-saturating")
    loss = dmd_loss(x0, g) + lg
    assert torch.isfinite(loss)
    loss.backward()
    got = _grads(unet, heads)
    assert got["student"] and not got["fake"] and not got["base"]
    unet.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    # the fake score model's loss trains only the fake LoRA
    lf = fake_score_backward(model, unet, x0.detach(), cond, torch.Generator().manual_seed(0))
    assert torch.isfinite(lf)
    got = _grads(unet)
    assert got["fake"] and not got["student"] and not got["base"]
    unet.zero_grad(set_to_none=True)
    # the discriminator's loss trains only its heads
    ld = gan_discriminator_loss(discriminate(unet, heads, z, t, cond), discriminate(unet, heads, x0.detach(), t, cond),
                                "hinge")
    ld.backward()
    got = _grads(unet, heads)
    assert torch.isfinite(ld) and got["heads"] and not got["student"] and not got["fake"] and not got["base"]


def test_unet_encoder_is_the_unets_own_first_half(setup):
    pipe, unet, model, cond, _ = setup
    captured = {}
    h = unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        unet(x, t, **cond.unet_kwargs())
        mine = unet_encoder(unet, x, t, cond)
    h.remove()
    torch.testing.assert_close(mine, captured["mid"])


def test_gan_losses():
    real, fake = torch.tensor([3.0, 2.0]), torch.tensor([-3.0, -2.0])
    assert gan_discriminator_loss(real, fake, "hinge").item() == 0.0
    assert gan_discriminator_loss(fake, real, "hinge").item() == 7.0  # mean(4, 3) + mean(4, 3)
    assert gan_generator_loss(real, "non-saturating") < gan_generator_loss(fake, "non-saturating")


def test_finetune_stage_all_terms(tiny_dir, tmp_path):
    cfg = load_config("toy-fast", [
        f"teacher.source={tiny_dir}", f"store.url={tmp_path / 'store'}",
        "stages=[teacher-trajectories,mlcd,finetune,evaluate]", "trajectories.num_samples=16",
        "trajectories.shard_size=16", "mlcd.iterations=2", "mlcd.batch_size=8", "lora.rank=4",
        "finetune.iterations=4", "finetune.batch_size=2", "finetune.q=2", "finetune.log_every=2",
        "finetune.checkpoint_every=2", "finetune.reward_weight=1", "finetune.reward_margin=0",
        "finetune.dmd_weight=1", "finetune.gan_weight=0.1", "finetune.gan_real=teacher",
        "finetune.gan_real_pool=4", "finetune.gan_real_steps=2", "finetune.regression_weight=1",
        "finetune.regression_pairs=3", "finetune.regression_steps=2",
        "evaluate.num_samples=4", "evaluate.steps=[2]", "evaluate.teacher_steps=[]"])
    res = run_pipeline(cfg, reporter=SilentReporter())
    ft = res[2]
    assert ft.stage == "finetune" and set(ft.summary["terms"]) == {"reward", "dmd", "gan", "regression"}
    assert {"reward", "dmd", "gan_g", "gan_d", "fake", "regression"} <= set(ft.summary["final"])
    art = open_store(cfg).artifact("finetune", ft.fingerprint)
    m = art.manifest(verify="checksum")
    assert {"lora.safetensors", "gan_real_pool.safetensors", "regression_pairs.safetensors"} <= set(m.files)
    assert len(art.load_tensors("regression_pairs.safetensors")["noise"]) == 3
    assert res[3].summary["rows"] and open_store(cfg).artifact("evaluate", res[3].fingerprint).manifest().inputs[
        "lora"].endswith(ft.fingerprint)


def test_regression_pairs_are_the_teachers_samples_and_the_term_their_mse(setup, tmp_path):
    """teacher_pool pairs each noise it keeps with the teacher's own sample from it (adapters off, whatever the student
    is), in batches, and reads a kept pool back instead of sampling again; the regression term is the weighted MSE
    of the student's x0 at the top timestep (pure noise) against that sample, reaches the student only, and a few
    steps on it bring the student's one step closer to the teacher's samples."""
    from tlcm_core.models import teacher_grid
    from tlcm_core.samplers import teacher_sample
    from tlcm_core.stages.finetune import FinetuneModels, FinetuneObjective, Micro, teacher_pool
    from tlcm_core.store import ArtifactStore

    pipe, unet, model, cond, uncond = setup
    with torch.no_grad():  # a student that is not the teacher
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    cfg = load_config("toy-fast", ["finetune.batch_size=2", "finetune.reward_weight=0", "finetune.dmd_weight=0",
                                   "finetune.gan_weight=0", "finetune.regression_weight=2", "finetune.q=1"])
    art = ArtifactStore(str(tmp_path)).artifact("finetune", "0" * 16)
    pool = teacher_pool(cfg, pipe, model, cond, uncond, art, name="pairs.safetensors", size=3, steps=3, seed=5)
    assert pool["prompt_idx"].tolist() == [0, 1, 0] and pool["noise"].shape == pool["latents"].shape
    assert pool["latents"].dtype == torch.float32

    def sample():
        with torch.no_grad():
            return teacher_sample(model, pool["noise"], 3, cond[pool["prompt_idx"]], uncond, cfg.schedule.guidance,
                                  teacher_grid(pipe, 32, 3))

    with adapters_disabled(unet):
        teacher = sample()
    # batches of 2 there, of 3 here: float sums in another order, amplified by CFG's scale of 8
    torch.testing.assert_close(pool["latents"], teacher, atol=1e-3, rtol=0)
    assert (sample() - teacher).abs().max() > 0.05  # with the student's adapter on, another sample
    again = teacher_pool(cfg, None, None, cond, uncond, art, name="pairs.safetensors", size=3, steps=3, seed=5)
    assert all(torch.equal(again[k], pool[k]) for k in pool)  # read back (with no model to sample with)

    one = {k: v[1:2] for k, v in pool.items()}  # a pool of one pair: every draw is that pair
    models = FinetuneModels(pipe, model, ["a red circle", "a blue square"], cond, uncond, pairs=one)
    obj = FinetuneObjective(cfg, cfg.finetune, models, torch.device("cpu"), {})
    terms = obj.loss(Micro(0, torch.Generator().manual_seed(0)))
    assert set(terms) == {"regression"}
    x_T, c = one["noise"].expand(2, -1, -1, -1), cond[one["prompt_idx"].expand(2)]
    x0, _ = model(x_T, torch.full((2,), 999), c)
    torch.testing.assert_close(terms["regression"], 2 * torch.nn.functional.mse_loss(x0, one["latents"].expand(2, -1,
                                                                                                           -1, -1)))
    unet.zero_grad(set_to_none=True)
    terms["regression"].backward()
    assert _grads(unet) == {"student": True, "fake": False, "base": False, "heads": False}

    params = [p for n, p in unet.named_parameters() if f".{ADAPTER}." in n]
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for k in range(6):
        opt.zero_grad(set_to_none=True)
        loss = obj.loss(Micro(k, torch.Generator().manual_seed(k)))["regression"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


class StopAt(SilentReporter):
    """Interrupts the work from inside, like a preemption, once the training `key` reports `step`."""

    def __init__(self, step, key="finetune"):
        super().__init__()
        self.step, self.key = step, key

    def progress(self, key, done, total, **metrics):
        if key == self.key and done >= self.step:
            raise KeyboardInterrupt(f"preempted at {done}")


def _resume_config(tiny_dir, store, *extra):
    return load_config("toy-fast", [
        f"teacher.source={tiny_dir}", f"store.url={store}", "stages=[teacher-trajectories,mlcd,finetune]",
        "trajectories.num_samples=16", "trajectories.shard_size=16", "mlcd.iterations=2", "mlcd.batch_size=8",
        "lora.rank=4", "finetune.iterations=6", "finetune.batch_size=2", "finetune.q=1", "finetune.log_every=1",
        "finetune.checkpoint_every=2", "finetune.dmd_weight=1", "finetune.gan_weight=0.1", *extra])


@pytest.mark.parametrize("extra", [(), ("finetune.ema_decay=0.7",)], ids=["last-weights", "weight-average"])
def test_finetune_resumes_from_its_checkpoint(tiny_dir, tmp_path, extra):
    cfg = _resume_config(tiny_dir, tmp_path / "store", *extra)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, reporter=StopAt(5))
    res = run_pipeline(cfg, reporter=SilentReporter())
    assert res[2].summary["resumed_from_step"] == 4  # the last checkpoint before the interruption
    # the same run uninterrupted ends with the same LoRA (each step's randomness is a function of the step)
    other = _resume_config(tiny_dir, tmp_path / "other", *extra)
    ref = run_pipeline(other, reporter=SilentReporter())
    a = open_store(cfg).artifact("finetune", res[2].fingerprint).load_tensors("lora.safetensors")
    b = open_store(other).artifact("finetune", ref[2].fingerprint).load_tensors("lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# finetune.inputs=sampler: the student trains on the states its own few-step sampler visits


def _flow_teacher(name: str):
    """A tiny FLUX.1- or SD3-shaped teacher (tests/tiny_flow.py) with a student and a fake score adapter."""
    from tiny_flow import MAX_SEQ, PROMPTS, RES, tiny_flux, tiny_sd3

    from tlcm_core.models import teacher_denoiser

    pipe = {"flux": tiny_flux, "sd3": tiny_sd3}[name]()
    net = pipe.transformer
    attach_lora(net, LoRAConfig(rank=4, alpha=4))
    attach_lora(net, LoRAConfig(rank=4, alpha=4), adapter_name=FAKE)
    net.set_adapter(ADAPTER)
    cond, uncond = encode_prompts(pipe, PROMPTS, RES, max_sequence_length=MAX_SEQ)
    return pipe, net, teacher_denoiser(pipe, RES), cond, uncond


@pytest.mark.parametrize("teacher, grid, gan_real", [("unet", "official", "teacher"),
                                                     ("unet", "official", "student-multistep"),
                                                     ("flux", "sigma", "student-multistep"),
                                                     ("sd3", "sigma", "teacher")])
def test_sampler_inputs_are_the_states_the_inference_sampler_visits(setup, teacher, grid, gan_real):
    """Each training input is the state the N-step TLCM sampler (the one evaluate and the exported scheduler run)
    is at when it reaches the drawn milestone, with the same re-noising draws, on the chosen milestone grid and for
    every teacher family; with the student's own multi-step sample as the GAN's real side, that sample is the
    sampler's output."""
    from tlcm_core.models import latent_shape
    from tlcm_core.samplers import student_x0_fn, tlcm_sample
    from tlcm_core.schedule import milestones, sampler_timesteps
    from tlcm_core.stages.finetune import FinetuneModels, FinetuneObjective, Micro

    pipe, net, model, cond, uncond = setup if teacher == "unet" else _flow_teacher(teacher)
    with torch.no_grad():  # a student that is not the teacher, so every state depends on the one before
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    cfg = load_config("toy-fast", ["finetune.inputs=sampler", "finetune.sampler_steps=[2,4]", "finetune.batch_size=6",
                                   f"finetune.sampler_grid={grid}", f"finetune.gan_real={gan_real}",
                                   "finetune.gan_weight=0.1"])
    models = FinetuneModels(pipe, model, ["a red circle", "a blue square"], cond, uncond,
                            heads=DiscriminatorHeads(8), real_pool={} if gan_real == "teacher" else None)
    obj = FinetuneObjective(cfg, cfg.finetune, models, torch.device("cpu"), {})
    bounds = milestones(model.schedule.T, cfg.schedule.segments)
    assert obj.grids == {n: sampler_timesteps(n, bounds, grid, model.schedule) for n in (2, 4)}
    if teacher == "unet":  # the release's grid
        assert obj.grids == {2: [999, 499], 4: [999, 749, 499, 124]}
    seen_n = set()
    for k in range(6):
        b = Micro(k, torch.Generator().manual_seed(100 + k), cond=cond[torch.tensor([0, 1, 0, 1, 0, 1])])
        x_T = torch.randn(6, *latent_shape(pipe, 32), generator=torch.Generator().manual_seed(k))
        z_t, t = obj.sampler_states(b, x_T)
        # the same draws, in the order the objective makes them: N, each sample's milestone, the re-noising
        g = torch.Generator().manual_seed(100 + k)
        ts = obj.grids[cfg.finetune.sampler_steps[int(torch.randint(2, (1,), generator=g))]]
        pick = torch.randint(len(ts), (6,), generator=g)
        noises = [torch.randn(x_T.shape, generator=g) for _ in ts[1:]]
        visited = []

        def x0_fn(x, tt):
            visited.append((x.clone(), int(tt[0])))
            return student_x0_fn(model, b.cond)(x, tt)

        final = tlcm_sample(x0_fn, x_T, ts, model.schedule, noises=noises)
        seen_n.add(len(ts))
        assert t.tolist() == [ts[i] for i in pick.tolist()]
        for j, i in enumerate(pick.tolist()):
            assert visited[i][1] == ts[i]
            torch.testing.assert_close(z_t[j], visited[i][0][j])
        if gan_real == "student-multistep":
            torch.testing.assert_close(b.z0, final)
        else:
            assert b.z0 is None  # no pass beyond the deepest state drawn
    assert seen_n == {2, 4}


def test_dmd_guidance_sets_the_real_scores_cfg_scale(setup):
    """finetune.dmd_guidance replaces schedule.guidance in DMD's real score: with a student and a fake score that are
    the teacher (both LoRAs zero), DMD pulls nowhere at scale 1 (fake = real) and somewhere at the presets' 7."""
    from tlcm_core.stages.finetune import FinetuneModels, FinetuneObjective, Micro

    pipe, unet, model, cond, uncond = setup
    models = FinetuneModels(pipe, model, ["a red circle", "a blue square"], cond, uncond)
    dmd = {}
    for w in ("1", "null"):
        cfg = load_config("toy-fast", ["finetune.dmd_weight=1", "finetune.reward_weight=0", "finetune.gan_weight=0",
                                       "finetune.batch_size=2", "finetune.q=1", f"finetune.dmd_guidance={w}"])
        obj = FinetuneObjective(cfg, cfg.finetune, models, torch.device("cpu"), {})
        dmd[w] = obj.loss(Micro(0, torch.Generator().manual_seed(0)))["dmd"].item()
    assert cfg.schedule.guidance > 1 and dmd["1"] == 0.0 < dmd["null"]


def test_finetune_stage_on_sampler_states(unphased, tiny_dir, tmp_path):
    """finetune.inputs=sampler trains (every term, a new fingerprint) and the paper's eq. 9 stays the default."""
    ft, art, cfg = unphased
    assert cfg.finetune.inputs == "renoised"
    other = _ft_config(tiny_dir, tmp_path, "finetune.inputs=sampler", "finetune.sampler_steps=[2]")
    res = run_pipeline(other, reporter=SilentReporter())
    sim = res[2]
    assert sim.fingerprint != ft.fingerprint
    assert {"reward", "dmd", "gan_g", "gan_d", "fake"} <= set(sim.summary["final"])
    a, b = art.load_tensors("lora.safetensors"), _finetune_art(other, sim).load_tensors("lora.safetensors")
    init = open_store(other).artifact("mlcd", res[1].fingerprint).load_tensors("lora.safetensors")
    assert a.keys() == b.keys() == init.keys()
    assert any(not torch.equal(b[k], init[k]) for k in b)  # it trained ...
    assert any(not torch.equal(a[k], b[k]) for k in a)  # ... on other inputs than eq. 9's


# ---------------------------------------------------------------------------------------------------------------------
# Phases (finetune.phases): consecutive trainings of the one LoRA


def _ft_config(tiny_dir, store, *extra):
    return load_config("toy-fast", [
        f"teacher.source={tiny_dir}", f"store.url={store}", "stages=[teacher-trajectories,mlcd,finetune]",
        "trajectories.num_samples=16", "trajectories.shard_size=16", "mlcd.iterations=2", "mlcd.batch_size=8",
        "lora.rank=4", "finetune.iterations=4", "finetune.batch_size=2", "finetune.q=1", "finetune.log_every=1",
        "finetune.checkpoint_every=2", "finetune.reward_weight=1", "finetune.reward_margin=0",
        "finetune.dmd_weight=1", "finetune.gan_weight=0.1", *extra])


# the paper's order at toy size: the reward alone (2 iterations at batch 2), then DMD + GAN (4 at batch 1)
TWO_PHASES = ("finetune.phases=[{iterations: 2, dmd_weight: 0, gan_weight: 0}, "
              "{iterations: 4, batch_size: 1, reward_weight: 0}]")


def _finetune_art(cfg, result):
    return open_store(cfg).artifact("finetune", result.fingerprint)


def _log(art) -> list[dict]:
    return [json.loads(line) for line in art.read_bytes("train_log.jsonl").decode().splitlines()]


@pytest.fixture(scope="module")
def unphased(tiny_dir, tmp_path_factory):
    cfg = _ft_config(tiny_dir, tmp_path_factory.mktemp("unphased"))
    ft = run_pipeline(cfg, reporter=SilentReporter())[2]
    return ft, _finetune_art(cfg, ft), cfg


def test_without_phases_there_is_one_run_and_no_phase_bookkeeping(unphased):
    ft, art, _ = unphased
    assert art.exists_file("checkpoints/latest.json") and not art.exists_file("checkpoints/phase-1/latest.json")
    assert "phase" not in _log(art)[0] and "phases" not in ft.summary


def test_a_recomputed_finetune_is_the_same_lora_whatever_ran_before_it(unphased, tiny_dir):
    """The fake score adapter and the discriminator heads draw their initial weights from torch's global RNG: the
    stage seeds it, so finetune recomputed alone (earlier stages cached, other draws before it in the process) gives
    the LoRA it gave right after MLCD -- one fingerprint, one result."""
    _, art, cfg = unphased
    before = art.load_tensors("lora.safetensors")
    torch.manual_seed(987)
    torch.rand(1000)
    again = run_pipeline(cfg, force=["finetune"], reporter=SilentReporter())[2]
    after = _finetune_art(cfg, again).load_tensors("lora.safetensors")
    assert again.fingerprint == art.uri.rstrip("/").split("/")[-1]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_one_phase_equal_to_the_section_trains_the_same_lora(unphased, tiny_dir, tmp_path):
    cfg = _ft_config(tiny_dir, tmp_path, "finetune.phases=[{iterations: 4}]")
    ft = run_pipeline(cfg, reporter=SilentReporter())[2]
    art = _finetune_art(cfg, ft)
    a, b = unphased[1].load_tensors("lora.safetensors"), art.load_tensors("lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["phase"] for r in _log(art)] == [1] * 4 and art.read_json("checkpoints/phase-1/latest.json")["step"] == 4


@pytest.fixture(scope="module")
def two_phases(tiny_dir, tmp_path_factory):
    cfg = _ft_config(tiny_dir, tmp_path_factory.mktemp("phases"), TWO_PHASES)
    ft = run_pipeline(cfg, reporter=SilentReporter())[2]
    return cfg, ft, _finetune_art(cfg, ft)


def test_two_phases_run_in_order_each_with_its_own_terms(two_phases):
    cfg, ft, art = two_phases
    s = ft.summary
    assert s["iterations"] == 6 and s["terms"] == ["reward", "dmd", "gan"]
    assert [(p["phase"], p["iterations"], p["batch_size"], p["terms"]) for p in s["phases"]] == \
        [(1, 2, 2, ["reward"]), (2, 4, 1, ["dmd", "gan"])]
    log = _log(art)
    assert [(r["phase"], r["step"]) for r in log] == [(1, 1), (1, 2), (2, 3), (2, 4), (2, 5), (2, 6)]
    dmd_gan = {"dmd", "gan_g", "fake", "gan_d"}
    for r in log:
        assert ("reward" in r, bool(dmd_gan & set(r))) == ((True, False) if r["phase"] == 1 else (False, True)), r
        if r["phase"] == 2:
            assert dmd_gan <= set(r)
    # each phase's end state is checkpointed in its own folder; the fake score model trains in phase 2 only
    from safetensors.torch import load as load_safetensors

    ends = {}
    for i, steps in ((1, 2), (2, 4)):
        info = art.read_json(f"checkpoints/phase-{i}/latest.json")
        assert info["step"] == steps
        ends[i] = load_safetensors(art.read_bytes(f"{info['dir']}/weights.safetensors"))
    fake_b = [k for k in ends[1] if k.startswith("fake.") and "lora_B" in k]
    assert fake_b and all(not ends[1][k].any() for k in fake_b) and any(ends[2][k].any() for k in fake_b)


@pytest.mark.parametrize("stop, resumed", [(1, 0), (3, 2)])  # before phase 2's first checkpoint, after it
def test_a_run_interrupted_in_phase_2_resumes_there_to_the_same_lora(two_phases, tiny_dir, tmp_path, stop, resumed):
    cfg = _ft_config(tiny_dir, tmp_path, TWO_PHASES)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, reporter=StopAt(stop, key="finetune-phase-2"))
    art = open_store(cfg).artifact("finetune", two_phases[1].fingerprint)  # same config, same fingerprint
    assert art.read_json("checkpoints/phase-1/latest.json")["step"] == 2  # phase 1 finished and recorded
    p2 = "checkpoints/phase-2/latest.json"
    assert (art.read_json(p2)["step"] if art.exists_file(p2) else 0) == resumed
    rec = RecordingReporter()
    ft = run_pipeline(cfg, reporter=rec)[2]
    # phase 1 is restored at its end, not trained again; phase 2 goes on from its checkpoint (or its start)
    assert [done for done, _ in rec.progress_of("finetune-phase-1")] == [2]
    assert [done for done, _ in rec.progress_of("finetune-phase-2")] == list(range(resumed, 5))
    assert [p["resumed_from_step"] for p in ft.summary["phases"]] == [2, resumed]
    assert ft.summary["resumed_from_step"] == 2 + resumed
    assert [r["step"] for r in _log(_finetune_art(cfg, ft))] == [1, 2, 3, 4, 5, 6]
    # the same LoRA as the uninterrupted run: phase 1's checkpoint also holds the fake score model and the
    # discriminator heads as they were built, which phase 2 starts from
    a = _finetune_art(cfg, ft).load_tensors("lora.safetensors")
    b = two_phases[2].load_tensors("lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("phases, says", [
    ("[{itrations: 2}]", ["phase 1 sets 'itrations'", "not a finetune field", "a phase may set: iterations"]),
    ("[{iterations: 2}, {reward_scorer: mps}]", ["phase 2 sets 'reward_scorer'", "shared by every phase",
                                                 "a phase may set: iterations"]),
    ("[{iterations: 2}, {}]", ["phase 2 is empty", "at least one of: iterations"]),
    ("[{reward_weight: 0, dmd_weight: 0, gan_weight: 0}]", ["phase 1 trains nothing", "all 0"]),
    ("[{reward_weight: 1}, {dmd_weight: 0}]", ["phase 2 trains nothing"]),  # the section's reward and gan are 0
    ("[{lr: -1}]", ["phase 1: lr = -1", "greater than 0"]),
])
def test_a_bad_phase_is_one_line_naming_it(phases, says):
    from tlcm_core.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config("toy-fast", ["stages=[teacher-trajectories,mlcd,finetune]", "finetune.reward_weight=0",
                                 "finetune.dmd_weight=1", "finetune.gan_weight=0", f"finetune.phases={phases}"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("invalid config") and lines[1].strip().startswith("finetune.phases")
    assert all(s in lines[1] for s in says), lines[1]


def test_phases_may_carry_all_the_weights():
    """With phases, the section's own weights may all be 0: each phase is checked instead. Values are validated
    (YAML reads `1e-5` as a string)."""
    cfg = load_config("toy-fast", ["stages=[teacher-trajectories,mlcd,finetune]", "finetune.reward_weight=0",
                                   "finetune.dmd_weight=0", "finetune.gan_weight=0",
                                   "finetune.phases=[{reward_weight: 1, lr: 1e-5}, {dmd_weight: 1, iterations: 3}]"])
    assert cfg.finetune.phases == [{"reward_weight": 1.0, "lr": 1e-5}, {"dmd_weight": 1.0, "iterations": 3}]
    one, two = cfg.finetune.phase_configs()
    assert (one.reward_weight, one.dmd_weight, one.lr, one.iterations) == (1.0, 0.0, 1e-5, cfg.finetune.iterations)
    assert (two.reward_weight, two.dmd_weight, two.iterations, two.phases) == (0.0, 1.0, 3, [])
