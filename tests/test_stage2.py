"""Stage 2 (LCD across milestones): its schedule, the teacher's p-step solver, and the stages end to end."""

import json

import numpy as np
import torch
from conftest import RecordingReporter

from tlcm_core.config import load_config
from tlcm_core.samplers import student_clean_latents, teacher_solver
from tlcm_core.stages.lcd_trajectories import plan_lcd_samples
from tlcm_core.models import Conditioning, Denoiser
from tlcm_core.pipeline import open_store, run_pipeline
from tlcm_core.progress import SilentReporter
from tlcm_core.schedule import NoiseSchedule, ddim, milestones

SCHED = NoiseSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})


class LinearEps(torch.nn.Module):
    """A deterministic stand-in UNet (eps = a*x + cond shift) for math tests."""

    def forward(self, x, t, encoder_hidden_states=None, return_dict=False, **kw):
        shift = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return (0.3 * x + shift + t.float().reshape(-1, 1, 1, 1) / 2000,)


def test_stage2_milestone_pairs():
    b = milestones(1000, 8)
    _, _, pidx, t_m, t_n, noise, eps = plan_lcd_samples(0, 400, base_seed=0, num_prompts=16, shape=(4, 2, 2), bounds=b)
    upper = set(b) - {0}
    assert set(t_m.tolist()) == upper  # every milestone but 0 is drawn
    asc = sorted(b)
    assert all(asc[asc.index(m) - 1] == n for m, n in zip(t_m.tolist(), t_n.tolist()))  # skip = T/M
    assert (t_m - t_n).max() <= 125 and (t_m - t_n).min() >= 124
    assert not torch.equal(noise, eps)
    again = plan_lcd_samples(100, 120, base_seed=0, num_prompts=16, shape=(4, 2, 2), bounds=b)
    assert torch.equal(again[3], t_m[100:120]) and torch.equal(again[5], noise[100:120])  # per-sample seeds


def test_p_step_solver_p1_is_one_ddim_step_and_p_matters():
    model = Denoiser(LinearEps(), SCHED)
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = Conditioning(torch.ones(3, 2, 2)), Conditioning(torch.zeros(1, 2, 2))
    tf, tt = torch.tensor([999, 499, 124]), torch.tensor([874, 374, 0])
    one = teacher_solver(model, x, tf, tt, 1, cond, uncond, 8.0)
    x0, _ = model.guided(x, tf, cond, uncond, 8.0)
    torch.testing.assert_close(one, ddim(SCHED, x, x0, tf, tt))
    three = teacher_solver(model, x, tf, tt, 3, cond, uncond, 8.0)
    assert not torch.allclose(one, three)


def test_student_clean_latents_q_steps():
    calls = []

    def x0_fn(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    z = student_clean_latents(x0_fn, torch.randn(2, 4, 2, 2), 4, SCHED)
    assert calls == [999, 749, 499, 249] and torch.equal(z, torch.zeros(2, 4, 2, 2))


def test_lcd_stages_end_to_end(tmp_path):
    from tlcm_core.toy.pipeline import build_toy_pipeline

    teacher = tmp_path / "tiny"
    build_toy_pipeline(seed=3).save_pretrained(teacher)
    cfg = load_config("toy-fast", [
        f"teacher.source={teacher}", f"store.url={tmp_path / 'store'}",
        "stages=[teacher-trajectories,mlcd,lcd-trajectories,lcd,evaluate]",
        "trajectories.num_samples=32", "trajectories.shard_size=16", "mlcd.iterations=3", "mlcd.batch_size=8",
        "lcd_trajectories.num_samples=24", "lcd_trajectories.shard_size=8", "lcd_trajectories.q=2",
        "lcd_trajectories.p=2", "lcd.iterations=3", "lcd.batch_size=8", "lcd.log_every=1", "lora.rank=4",
        "evaluate.num_samples=4", "evaluate.steps=[2]", "evaluate.teacher_steps=[]"])
    res = run_pipeline(cfg, reporter=SilentReporter())
    assert [r.stage for r in res] == ["teacher-trajectories", "mlcd", "lcd-trajectories", "lcd", "evaluate"]
    store = open_store(cfg)
    pairs = store.artifact("lcd-trajectories", res[2].fingerprint)
    t_hi, t_lo = pairs.open_array("t_hi")[...], pairs.open_array("t_lo")[...]
    assert len(t_hi) == 24 and set(t_hi) <= set(milestones(1000, 8)) and np.all(t_hi - t_lo >= 124)
    lcd = store.artifact("lcd", res[3].fingerprint).manifest(verify="checksum")
    assert lcd.inputs["init"].endswith(res[1].fingerprint) and lcd.summary["final_loss"] >= 0
    ev = store.artifact("evaluate", res[4].fingerprint).manifest()
    assert ev.inputs["lora"].endswith(res[3].fingerprint)  # evaluate follows the last LoRA stage
    # stage 2 continued the stage-1 LoRA: different weights, same keys
    a = store.artifact("mlcd", res[1].fingerprint).load_tensors("lora.safetensors")
    b = store.artifact("lcd", res[3].fingerprint).load_tensors("lora.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # lcd-trajectories again in two local processes (compute.cpu_processes=2; the MLCD LoRA passed to them as an
    # input), into another artifact: the same pairs
    from tlcm_core.pipeline import execute, stage_inputs
    from tlcm_core.stages import REGISTRY

    two = cfg.model_copy(update={"compute": cfg.compute.model_copy(update={"cpu_processes": 2})})
    again = store.artifact("lcd-trajectories", "f" * 16)
    rec = RecordingReporter()
    execute(REGISTRY["lcd-trajectories"], two, stage_inputs(cfg, store, "lcd-trajectories"), again, rec)
    logs = rec.logs
    assert any("3 shards in 2 local processes" in m for m in logs) and not any("exited" in m for m in logs), logs
    assert again.done_markers() >= {"shard-00000", "shard-00001", "shard-00002"}
    for name in ("x_hi", "x_lo", "t_hi", "t_lo", "prompt_idx"):
        assert np.array_equal(again.open_array(name)[...], pairs.open_array(name)[...]), name


def test_lcd_compared_after_the_jump_weighs_each_milestone_as_the_sampler_sees_it():
    """lcd.compare=jump with MSE is eq. 10's x0 error scaled per sample by c = a_n - s_n a_m / s_m (the DDIM jump's
    sensitivity to x0); at t_n = 0 the target is still x_lo itself."""
    from tlcm_core.losses import mse
    from tlcm_core.pairs import Batch
    from tlcm_core.stages.lcd import lcd_loss

    g = torch.Generator().manual_seed(1)
    model = Denoiser(LinearEps(), SCHED)
    t_hi, t_lo = torch.tensor([999, 499, 124]), torch.tensor([874, 374, 0])
    batch = Batch(torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g), t_hi, t_lo, t_lo,
                  Conditioning(torch.randn(3, 5, 8, generator=g)))
    x0_hi, _ = model(batch.x_hi, t_hi, batch.cond)
    target = torch.where((t_lo == 0).reshape(-1, 1, 1, 1), batch.x_lo, model(batch.x_lo, t_lo, batch.cond)[0])
    a_m, s_m = SCHED.coeffs(t_hi, batch.x_hi)
    a_n, s_n = SCHED.coeffs(t_lo, batch.x_hi)
    c = (a_n - s_n * a_m / s_m).flatten()
    per_sample = (x0_hi - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(lcd_loss(model, batch, mse), per_sample.mean())
    torch.testing.assert_close(lcd_loss(model, batch, mse, compare="jump"), (c**2 * per_sample).mean())
    assert c[0] < 0.1 < 0.9 < c[2]  # 999 barely counts, 124 almost fully


def test_lcd_with_an_mlcd_anchor_reads_the_teachers_pairs_and_logs_both_terms(tmp_path):
    """lcd.mlcd_weight > 0: the lcd stage takes the teacher's pairs as a second input and adds MLCD's loss on them
    to each step (both terms in the log); with 0 (the paper's LCD; the toy presets use 1000) the stage's inputs are
    the paper's."""
    from tlcm_core.pipeline import plan
    from tlcm_core.toy.pipeline import build_toy_pipeline

    teacher = tmp_path / "tiny"
    build_toy_pipeline(seed=3).save_pretrained(teacher)
    base = [f"teacher.source={teacher}", f"store.url={tmp_path / 'store'}",
            "stages=[teacher-trajectories,mlcd,lcd-trajectories,lcd]", "trajectories.num_samples=32",
            "trajectories.shard_size=16", "mlcd.iterations=2", "mlcd.batch_size=8", "lcd_trajectories.num_samples=16",
            "lcd_trajectories.shard_size=8", "lcd_trajectories.q=1", "lcd_trajectories.p=1", "lcd.iterations=2",
            "lcd.batch_size=8", "lcd.log_every=1", "lora.rank=4"]
    assert set(plan(load_config("toy-fast", [*base, "lcd.mlcd_weight=0"]))["lcd"].inputs) == {"pairs", "init"}
    cfg = load_config("toy-fast", [*base, "lcd.mlcd_weight=0.5"])
    res = run_pipeline(cfg, reporter=SilentReporter())
    art = open_store(cfg).artifact("lcd", res[3].fingerprint)
    assert art.manifest().inputs["anchor"].endswith(res[0].fingerprint)
    log = [json.loads(line) for line in art.read_bytes("train_log.jsonl").decode().splitlines()]
    assert {"consistency", "mlcd_anchor"} <= set(log[-1]) and log[-1]["mlcd_anchor"] > 0
    assert abs(log[-1]["loss"] - log[-1]["consistency"] - log[-1]["mlcd_anchor"]) < 1e-6
    # a smaller anchor batch (lcd.anchor_batch_size) is a different training of the same stage
    small = load_config("toy-fast", [*base, "lcd.mlcd_weight=0.5", "lcd.anchor_batch_size=2"])
    res2 = run_pipeline(small, reporter=SilentReporter())
    assert res2[2].fingerprint == res[2].fingerprint and res2[3].fingerprint != res[3].fingerprint
    a = art.load_tensors("lora.safetensors")
    b = open_store(small).artifact("lcd", res2[3].fingerprint).load_tensors("lora.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
