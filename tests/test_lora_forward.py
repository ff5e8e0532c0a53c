"""compute.lora_forward: a LoRA layer run as one op on W + B A * alpha / r ("merged") is PEFT's forward ("separate")
up to float rounding, in its output and in the adapter's gradients, with adapters off, with a second adapter active,
and after a deep copy; and a stage trained either way makes the same LoRA under its own fingerprint."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from tlcm_core.config import LoRAConfig, load_config
from tlcm_core.lora import ADAPTER, active_adapter, adapters_disabled, attach_lora, set_lora_forward
from tlcm_core.pipeline import open_store, plan, run_pipeline
from tlcm_core.progress import SilentReporter
from tlcm_core.toy.pipeline import POOLED_DIM, TEXT_DIM, unet_config

CLOSE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def unet():
    """The toy UNet (convolutions and attention) with a trained-looking LoRA: B non-zero, alpha != rank."""
    torch.manual_seed(0)
    net = UNet2DConditionModel(**unet_config())
    attach_lora(net, LoRAConfig(rank=8, alpha=4))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return net


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(n, 4, 16, 16, generator=g), timestep=torch.tensor([999, 500, 20][:n]),
                encoder_hidden_states=torch.randn(n, 7, 2 * TEXT_DIM, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(n, POOLED_DIM, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).repeat(n, 1)})


def _out_and_grads(net):
    net.zero_grad(set_to_none=True)
    out = net(**_inputs()).sample
    (out ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_merged_is_peft_forward_in_output_and_gradients(unet):
    ref, ref_grads = _out_and_grads(unet)
    assert ref_grads and all("lora_" in n for n in ref_grads)  # only the adapter trains
    n = set_lora_forward(unet, "merged")
    assert n == sum(1 for m in unet.modules() if "forward" in m.__dict__) > 50  # every adapted Linear and Conv2d
    out, grads = _out_and_grads(unet)
    torch.testing.assert_close(out, ref, **CLOSE)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **CLOSE, msg=name)
    set_lora_forward(unet, "separate")
    assert not any("forward" in m.__dict__ for m in unet.modules())
    torch.testing.assert_close(_out_and_grads(unet)[0], ref, rtol=0, atol=0)  # PEFT's own forward again


def test_merged_follows_adapters_off_a_second_adapter_and_a_deep_copy(unet):
    with torch.no_grad():
        x = _inputs()
        with adapters_disabled(unet):
            base = unet(**x).sample
        ref = unet(**x).sample
        attach_lora(unet, LoRAConfig(rank=4, alpha=4), adapter_name="other")  # after: covered too
        for name, p in unet.named_parameters():
            if "lora_B" in name and ".other." in name:
                p.normal_(std=0.05)
        unet.set_adapter(ADAPTER)
        with active_adapter(unet, "other"):
            other = unet(**x).sample
        set_lora_forward(unet, "merged")
        assert not torch.allclose(ref, base, **CLOSE) and not torch.allclose(other, ref, **CLOSE)
        with adapters_disabled(unet):
            torch.testing.assert_close(unet(**x).sample, base, rtol=0, atol=0)  # PEFT's path: the base layers
        torch.testing.assert_close(unet(**x).sample, ref, **CLOSE)
        with active_adapter(unet, "other"):
            torch.testing.assert_close(unet(**x).sample, other, **CLOSE)
        twin = copy.deepcopy(unet)
        for name, p in twin.named_parameters():
            if "lora_B" in name and f".{ADAPTER}." in name:
                p.zero_()  # the copy's own adapter, not the original's, must act in the copy's layers
        torch.testing.assert_close(twin(**x).sample, base, **CLOSE)
        torch.testing.assert_close(unet(**x).sample, ref, **CLOSE)


def test_merged_leaves_autocast_to_peft(unet):
    """Under autocast the one op would round W + B A alpha/r to bfloat16 and lose most of the small delta; PEFT adds
    the delta's output instead, so merged must run PEFT's forward there: the same bits."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = unet(**_inputs()).sample
        set_lora_forward(unet, "merged")
        torch.testing.assert_close(unet(**_inputs()).sample, ref, rtol=0, atol=0)


def test_a_bad_mode_is_refused(unet):
    with pytest.raises(ValueError, match="allowed: separate, merged"):
        set_lora_forward(unet, "fused")


def test_mlcd_trained_merged_makes_the_separate_lora_under_its_own_fingerprint(tmp_path):
    """The stage trains the same LoRA (float rounding apart) either way; the default keeps every fingerprint it
    had before the option, and merged is part of the artifact's record."""
    common = [f"store.url={tmp_path}", "trajectories.num_samples=64", "mlcd.iterations=6", "mlcd.batch_size=8",
              "mlcd.checkpoint_every=100", "mlcd.log_every=3"]
    sep = load_config("toy-fast", common + ["compute.lora_forward=separate"])  # the default; the toy presets merge
    merged = load_config("toy-fast", common + ["compute.lora_forward=merged"])
    assert plan(sep)["teacher-trajectories"].fingerprint == plan(merged)["teacher-trajectories"].fingerprint
    assert plan(sep)["mlcd"].fingerprint != plan(merged)["mlcd"].fingerprint
    loras = []
    for cfg in (sep, merged):
        res = {r.stage: r for r in run_pipeline(cfg, stages=["teacher-trajectories", "mlcd"],
                                                reporter=SilentReporter())}
        loras.append(open_store(cfg).artifact("mlcd", res["mlcd"].fingerprint).load_tensors("lora.safetensors"))
    a, b = loras
    assert a.keys() == b.keys() and any(v.abs().max() > 1e-4 for k, v in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-6, msg=k)
