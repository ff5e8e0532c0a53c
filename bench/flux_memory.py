"""FLUX.1-dev on one 80 GB GPU, on paper (issue 17): parameters, weights, LoRA and optimizer states, and the
activations of one training sample at 1024 px, with and without gradient checkpointing, per pipeline stage.

Method. Parameters are counted on the real configs built on the meta device (no weights, no memory): FLUX.1-dev's
FluxTransformer2DModel, its T5-XXL and CLIP-L text encoders and 16-channel VAE, the MPS scorer's CLIP ViT-H/14, and
our LoRA attached with PEFT (rank 64 on the official FLUX release's target modules; the fake score adapter rank 16).

Activations are what autograd keeps for the backward pass, traced on the meta device: the real forward pass (the
diffusers code, 4096 image + 512 text tokens, bf16) runs on shapes only while torch's saved-tensor hooks record
every tensor saved for backward, deduplicated by storage, parameters excluded. Attention is traced as a fused
(flash / memory-efficient) kernel saves it: q, k, v, the output and the row log-sum-exp, never the N x N matrix. A
sample's peak is what is saved plus one block's worth for the backward pass's transients; with gradient
checkpointing it is the blocks' inputs (kept) plus one block recomputed plus that block's transients. Not counted:
the CUDA context and allocator slack (a margin of 6 GB is kept free), autocast's float32 copies of norm inputs.

`--check` measures the same quantities on a FLUX-shaped transformer small enough for a CPU (float32, real tensors):
the peak RSS of forward + backward above the RSS before it (Linux's VmHWM, reset just before the pass; glibc told to
return freed blocks at once), with and without checkpointing, against the meta-traced prediction.

    python bench/flux_memory.py            # the tables, printed
    python bench/flux_memory.py --check    # plus the measured CPU check (a minute on one thread)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

GB = 1e9
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
IMAGE_TOKENS, TEXT_TOKENS = 4096, 512  # 1024 px: (1024 / 8 / 2)^2 packed latents; T5 at max_sequence_length 512
GPU_GB, MARGIN_GB = 80.0, 6.0


# ---------------------------------------------------------------------------------------------------------------------
# Parameters


def meta_flux(config: dict = FLUX_DEV):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def lora_params(net, rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on the FLUX release's target modules, attached as the pipeline does."""
    from peft import LoraConfig

    from tlcm_core.families.flux import FLUX_TARGET_MODULES

    net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(FLUX_TARGET_MODULES)),
                    adapter_name=f"r{rank}")
    n = sum(p.numel() for k, p in net.named_parameters() if f".r{rank}." in k)
    net.delete_adapters(f"r{rank}")
    return n


def other_params() -> dict[str, int]:
    """The text encoders, the VAE and the MPS scorer (CLIP ViT-H/14), from their published configs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tlcm_core.stages.finetune import TokenDiscriminatorHeads

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu"))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            use_quant_conv=False, use_post_quant_conv=False)
        mps = CLIPModel(CLIPConfig(
            text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=16, patch_size=14, image_size=224), projection_dim=1024))
        heads = TokenDiscriminatorHeads(FLUX_DEV["num_attention_heads"] * FLUX_DEV["attention_head_dim"])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"t5": count(t5), "clip": count(clip), "vae": count(vae), "mps": count(mps), "heads": count(heads)}


# ---------------------------------------------------------------------------------------------------------------------
# Activations, traced


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel keeps for backward: q, k, v, the output and the log-sum-exp per row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FusedAttention.apply(query, key, value)


class SavedTrace:
    """Bytes autograd saves for backward during a forward pass, per block (`label`), storages counted once."""

    def __init__(self, params):
        self.params, self.saved, self.label = {id(p) for p in params}, {}, "outside"

    def pack(self, t):
        base = t if t._base is None else t._base
        if id(base) not in self.params and id(base) not in self.saved:
            self.saved[id(base)] = (base, self.label)
        return t

    def by_label(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for t, label in self.saved.values():
            out[label] += t.numel() * t.element_size()
        return out


def _label_blocks(net, trace: SavedTrace, inputs: dict | None = None) -> list:
    """Forward hooks naming the block that runs; with `inputs`, record each block's input bytes there."""
    handles = []
    blocks = [(f"double{i}", b) for i, b in enumerate(net.transformer_blocks)]
    blocks += [(f"single{i}", b) for i, b in enumerate(getattr(net, "single_transformer_blocks", []))]
    for name, block in blocks:
        def pre(m, args, kwargs, name=name):
            trace.label = name
            if inputs is not None:
                ts = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
                inputs[name] = sum(t.numel() * t.element_size() for t in ts if t.requires_grad)

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o: setattr(trace, "label", "outside")))
    return handles


def flux_inputs(config: dict, batch: int, image_tokens: int, text_tokens: int, dtype, device="meta") -> dict:
    with torch.device(device):
        return dict(hidden_states=torch.randn(batch, image_tokens, config["in_channels"], dtype=dtype),
                    encoder_hidden_states=torch.randn(batch, text_tokens, config["joint_attention_dim"], dtype=dtype),
                    pooled_projections=torch.randn(batch, config["pooled_projection_dim"], dtype=dtype),
                    timestep=torch.full((batch,), 0.5, dtype=dtype), guidance=torch.full((batch,), 3.5),
                    txt_ids=torch.zeros(text_tokens, 3), img_ids=torch.zeros(image_tokens, 3))


class _Stop(Exception):
    pass


def _traced(net, run) -> tuple[SavedTrace, dict]:
    """Run `run()` (a forward pass of `net` or of a part of it) under the saved-tensor trace, attention fused."""
    trace, block_inputs = SavedTrace(net.parameters()), {}
    handles = _label_blocks(net, trace, block_inputs) if hasattr(net, "transformer_blocks") else []
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(trace.pack, lambda t: t):
            try:
                run()
            except _Stop:
                pass
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()
    return trace, block_inputs


def student_activations(net, inputs: dict) -> dict[str, float]:
    """Bytes per sample of a training forward pass through the LoRA'd transformer: `plain` (every activation kept)
    and `checkpointed` (block inputs kept, one block recomputed), both with one block's backward transients."""
    trace, block_inputs = _traced(net, lambda: net(**inputs, return_dict=False))
    by = trace.by_label()
    block = max(v for k, v in by.items() if k != "outside")
    saved = sum(by.values())
    kept = by["outside"] + sum(block_inputs.values())
    return {"saved": saved, "block": block, "plain": saved + block, "checkpointed": kept + 2 * block,
            "kept": kept}


def discriminator_activations(net, inputs: dict) -> dict[str, float]:
    """The GAN generator's path: the double-stream blocks with every adapter off, the gradient flowing to the
    student's x0 (the input), stopped where the single-stream blocks begin."""
    def run():
        hook = net.single_transformer_blocks[0].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(_Stop()))
        try:
            net(**{**inputs, "hidden_states": inputs["hidden_states"].clone().requires_grad_(True)}, return_dict=False)
        finally:
            hook.remove()

    net.disable_adapters()
    try:
        trace, block_inputs = _traced(net, run)
    finally:
        net.enable_adapters()
    by = trace.by_label()
    block = max(v for k, v in by.items() if k != "outside")
    kept = by["outside"] + sum(block_inputs.values())
    return {"plain": sum(by.values()) + block, "checkpointed": kept + 2 * block}


def reward_activations(batch_dtype=torch.bfloat16) -> dict[str, float]:
    """The reward's graph per sample: the VAE decoding 128x128x16 latents to 1024 px, and MPS's ViT-H/14 at 224 px,
    both differentiated w.r.t. their input (not checkpointed: the option applies to the denoising network)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            use_quant_conv=False, use_post_quant_conv=False).to(batch_dtype).requires_grad_(False)
        vit = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                               num_attention_heads=16, patch_size=14, image_size=224))
        vit = vit.to(batch_dtype).requires_grad_(False)
        z = torch.empty(1, 16, 128, 128, dtype=batch_dtype, requires_grad=True)
        px = torch.empty(1, 3, 224, 224, dtype=batch_dtype, requires_grad=True)
    decode, _ = _traced(vae, lambda: vae.decode(z))
    score, _ = _traced(vit, lambda: vit(pixel_values=px))
    return {"vae": sum(decode.by_label().values()), "mps": sum(score.by_label().values())}


def inference_activations(student: dict[str, float]) -> float:
    """A no-grad forward pass holds about one block's intermediates at a time: bounded by a block's saved bytes."""
    return student["block"]


# ---------------------------------------------------------------------------------------------------------------------
# The measured check: a FLUX-shaped transformer small enough for a CPU, float32, real tensors

CHECK = dict(FLUX_DEV, num_layers=3, num_single_layers=6, num_attention_heads=4, joint_attention_dim=512,
             pooled_projection_dim=128)
CHECK_TOKENS = ((1024, 128), (2048, 256))  # (image, text) tokens: the scaling in sequence length


def _with_lora(net, rank: int = 64):
    from peft import LoraConfig

    from tlcm_core.families.flux import FLUX_TARGET_MODULES

    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=8, target_modules=list(FLUX_TARGET_MODULES)), adapter_name="tlcm")
    for k, p in net.named_parameters():
        if "lora_" in k:
            p.requires_grad_(True)
    return net


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    """Linux: reset the process's RSS high-water mark (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_child(checkpointing: bool, tokens: tuple[int, int]) -> dict:
    """In a fresh process: peak RSS of one forward + backward of the check transformer at (image, text) `tokens`
    above the resident size before it (model, LoRA, inputs and a small warm-up pass done)."""
    import gc

    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    net = _with_lora(FluxTransformer2DModel(**CHECK)).train()
    if checkpointing:
        from tlcm_core.families import FLUX

        FLUX.enable_gradient_checkpointing(net)
    # a small pass first: one-time allocations (lazy imports, kernel caches) stay out of the measured peak
    net(**flux_inputs(CHECK, 1, 64, 16, torch.float32, device="cpu"), return_dict=False)[0].mean().backward()
    net.zero_grad(set_to_none=True)
    inputs = flux_inputs(CHECK, 1, *tokens, torch.float32, device="cpu")
    gc.collect()
    _reset_peak()  # the high-water mark of building the model is not the pass's
    before = _status_kb("VmRSS") * 1024
    net(**inputs, return_dict=False)[0].square().mean().backward()
    peak = _status_kb("VmHWM") * 1024
    lora_grads = sum(p.numel() * 4 for p in net.parameters() if p.requires_grad)
    return {"measured": peak - before, "lora_grads": lora_grads}


def measured_check() -> list[dict]:
    """Prediction (meta trace, float32) vs measurement (peak RSS) for the check transformer at two token counts."""
    net = _with_lora(meta_flux(CHECK))
    rows = []
    for tokens in CHECK_TOKENS:
        predicted = student_activations(net, flux_inputs(CHECK, 1, *tokens, torch.float32))
        for ckpt in (False, True):
            # glibc returns freed blocks above a fixed mmap threshold to the system at once: RSS follows live memory
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps([ckpt, tokens])],
                                 capture_output=True, text=True, check=True, env=env)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            pred = predicted["checkpointed" if ckpt else "plain"] + m["lora_grads"]
            rows.append({"image + text tokens": f"{tokens[0]} + {tokens[1]}", "checkpointing": "on" if ckpt else "off",
                         "predicted MB": round(pred / 1e6), "measured MB": round(m["measured"] / 1e6),
                         "measured / predicted": round(m["measured"] / pred, 2)})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# The tables


def measure_all() -> tuple[dict, dict]:
    """(parameter counts, activation bytes per sample) of FLUX.1-dev at 1024 px."""
    net = meta_flux()
    params = {"flux": sum(p.numel() for p in net.parameters()), "lora64": lora_params(net, 64),
              "lora16": lora_params(net, 16), **other_params()}
    net = _with_lora(net).to(torch.bfloat16)
    for k, p in net.named_parameters():
        p.requires_grad_("lora_" in k)
    inputs = flux_inputs(FLUX_DEV, 1, IMAGE_TOKENS, TEXT_TOKENS, torch.bfloat16)
    student = student_activations(net, inputs)
    acts = {"student": student, "disc": discriminator_activations(net, inputs), "reward": reward_activations(),
            "infer": inference_activations(student)}
    return params, acts


def _fit(resident: float, per_sample: float) -> str:
    n = int((GPU_GB - MARGIN_GB - resident) // per_sample)
    return str(n) if n >= 1 else "does not fit"


def stage_rows(p: dict, a: dict) -> list[dict]:
    """Per stage: what it holds, a sample's activations without / with checkpointing, the largest batch on 80 GB
    (6 GB kept free) with the frozen network in bf16, and as the code loads it today (the trainers: float32)."""
    g = {k: v / GB for k, v in p.items()}
    w16, w32, text, vae = 2 * g["flux"], 4 * g["flux"], 2 * (g["t5"] + g["clip"]), 2 * g["vae"]
    lora, fake, heads, mps = 16 * g["lora64"], 16 * g["lora16"], 16 * g["heads"], 4 * g["mps"]
    inf = a["infer"] / GB
    st = {k: a["student"][k] / GB + inf for k in ("plain", "checkpointed")}  # + the no-grad target / DMD forwards
    disc = {k: a["disc"][k] / GB for k in ("plain", "checkpointed")}
    reward = (a["reward"]["vae"] + a["reward"]["mps"]) / GB
    ft = lora + fake + heads
    rows = [  # stage, held, resident bf16, resident today, per-sample plain, per-sample checkpointed
        ("teacher-trajectories, lcd-trajectories, evaluate", "network, text encoders, VAE (bf16)",
         w16 + text + vae, w16 + text + vae, inf, None),
        ("mlcd, lcd", "network + student LoRA (fp32 weights, grads, AdamW)", w16 + lora, w32 + lora, st["plain"],
         st["checkpointed"]),
        ("finetune phase 1: MPS reward", "network + both LoRAs + heads + VAE + MPS (fp32)", w16 + ft + vae + mps,
         w32 + ft + 2 * vae + mps, st["plain"] + reward, st["checkpointed"] + reward),
        ("finetune phase 2: DMD + GAN", "network + both LoRAs + heads + VAE", w16 + ft + vae, w32 + ft + 2 * vae,
         st["plain"] + disc["plain"], st["checkpointed"] + disc["checkpointed"]),
        ("finetune, all terms at once", "as phase 1", w16 + ft + vae + mps, w32 + ft + 2 * vae + mps,
         st["plain"] + disc["plain"] + reward, st["checkpointed"] + disc["checkpointed"] + reward),
    ]
    out = []
    for stage, held, r16, r32, plain, ckpt in rows:
        out.append({"stage": stage, "holds": held, "resident GB (bf16 network)": round(r16, 1),
                    "GB/sample": round(plain, 1), "GB/sample, checkpointed": "-" if ckpt is None else round(ckpt, 2),
                    "batch": _fit(r16, plain), "batch, checkpointed": "-" if ckpt is None else _fit(r16, ckpt),
                    "today (fp32 network), checkpointed": _fit(r32, ckpt if ckpt is not None else plain)})
    return out


def main() -> None:
    from common import table  # bench/common.py

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="also measure the CPU check (about a minute)")
    args = ap.parse_args()
    params, acts = measure_all()
    print(json.dumps({"params": params, "activations": acts}, indent=1))
    print(table(stage_rows(params, acts)))
    if args.check:
        print(table(measured_check()))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if "--child" in sys.argv:
        ckpt, tokens = json.loads(sys.argv[sys.argv.index("--child") + 1])
        print(json.dumps(measure_child(ckpt, tuple(tokens))))
    else:
        main()
