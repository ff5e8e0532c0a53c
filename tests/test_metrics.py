"""The real metrics (CLIP score, LAION aesthetic, ImageReward, FID) through their real loaders and code paths, on tiny
random-weight models built offline: an open_clip model folder (local-dir:), a random aesthetic MLP saved under the
pinned LAION file name, a random ImageReward checkpoint in the published layout with a tiny BERT vocabulary, and a
random-weight torch-fidelity InceptionV3 weights file. Plus the evaluate wiring into a Table 1 row."""

from __future__ import annotations

import functools
import json
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from tlcm_core.config import MetricsConfig
from tlcm_core.metrics import (AESTHETIC_FILE, FID, MetricsError, RealMetrics, fid_preprocess, load_captions,
                               reference_image_urls)

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a photo of a red square"]


def _open_clip_dir(path, embed_dim: int, seed: int) -> str:
    import open_clip
    from safetensors.torch import save_file

    cfg = {"model_cfg": {"embed_dim": embed_dim,
                         "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
                              "resize_mode": "shortest"}}
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return f"local-dir:{path}"


def _imagereward_files(root) -> tuple[str, str, str]:
    from tlcm_core.imagereward import ImageRewardModel

    tok = root / "bert"
    tok.mkdir(parents=True)
    words = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle",
             "square", "triangle", "photo", "of"]
    (tok / "vocab.txt").write_text("\n".join(words) + "\n")
    med = dict(vocab_size=len(words) + 2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=40, layer_norm_eps=1e-12, pad_token_id=0,
               hidden_act="gelu", add_cross_attention=True, encoder_width=768)
    (root / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(1)
    model = ImageRewardModel(med, image_size=32, patch=16, vision_width=128, depth=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v for k, v in model.state_dict().items()}
    state["blip.vision_proj.weight"] = torch.zeros(4, 128)  # present in the published file, unused by the score
    torch.save(state, root / "ImageReward.pt")
    return str(root / "ImageReward.pt"), str(root / "med_config.json"), str(tok)


def _inception_weights(path) -> str:
    """torch-fidelity's InceptionV3 with random weights, saved as a plain state dict (what the real file is)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(2)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"), \
            mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return str(path)


class TinyFeatures(torch.nn.Module):
    """A fixed random projection of 8x8-pooled pixels: a fast stand-in for InceptionV3 with real FID behaviour."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 16)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(16, 192, generator=torch.Generator().manual_seed(3)) / 8)

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 8)
        return self.proj(x.flatten(1)).double()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    mlp = root / "laion" / AESTHETIC_FILE
    mlp.parent.mkdir()
    from tlcm_core.imagereward import _RewardMLP

    torch.manual_seed(4)
    torch.save(_RewardMLP(16).state_dict(), mlp)
    ir, med, tok = _imagereward_files(root / "ir")
    refs = root / "refs"
    refs.mkdir()
    g = torch.Generator().manual_seed(5)
    for i in range(6):  # real images: non-square, as COCO's
        arr = (torch.rand(30, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(refs / f"{i:03d}.png")
    return {"clip_model": _open_clip_dir(root / "clip", 16, 6), "clip_pretrained": None,
            "aesthetic_clip_model": _open_clip_dir(root / "clip-l", 16, 7), "aesthetic_clip_pretrained": None,
            "aesthetic_weights": str(mlp), "imagereward_weights": ir, "imagereward_med_config": med,
            "imagereward_tokenizer": tok, "reference_images": str(refs), "batch_size": 3}


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_clip_aesthetic_imagereward(tiny):
    m = RealMetrics(MetricsConfig(**tiny, kind="real", run=["clip", "aesthetic", "imagereward"]))
    images = _images(4, 0)
    out = m(images, PROMPTS)
    assert set(out) == {"clip_score", "aesthetic_score", "image_reward"}
    assert all(isinstance(v, float) and v == v for v in out.values())
    assert 0.0 <= out["clip_score"] <= 100.0
    # streaming in uneven batches gives the row's mean
    m.reset()
    m.update(images[:1], PROMPTS[:1])
    m.update(images[1:], PROMPTS[1:])
    streamed = m.compute()
    assert streamed == pytest.approx(out, abs=1e-3)
    # the CLIP score is 100 x cosine of the open_clip embeddings of the CLIP-preprocessed PNG-quantised image
    from tlcm_core.metrics import to_pil

    clip = m.scorers["clip_score"]
    pil = to_pil(images[:2])
    with torch.no_grad():
        x = torch.stack([clip.preprocess(p) for p in pil])
        a = torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1)
        b = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(PROMPTS[:2])), dim=-1)
    torch.testing.assert_close(clip(pil, PROMPTS[:2]), (100 * (a * b).sum(-1)).clamp(min=0))
    # ImageReward depends on the prompt
    ir = m.scorers["image_reward"]
    assert not torch.allclose(ir(pil, PROMPTS[:2]), ir(pil, PROMPTS[2:4]))


def test_fid_with_inception_weights_file(tiny, tmp_path):
    """The real path: torchmetrics FID on torch-fidelity's InceptionV3 loaded from a weights file (random here)."""
    weights = _inception_weights(tmp_path / "inception.pth")
    refs = tmp_path / "refs"  # two reference images: InceptionV3 at 299 px takes ~1 s an image on one core
    refs.mkdir()
    for p in reference_image_urls(tiny["reference_images"])[:2]:
        (refs / p.rsplit("/", 1)[-1]).write_bytes(open(p, "rb").read())
    cfg = MetricsConfig(**{**tiny, "reference_images": str(refs), "fid_inception_weights": weights, "run": ["fid"]})
    with mock.patch.dict("os.environ", {"TLCM_CACHE": str(tmp_path / "cache")}):
        m = RealMetrics(cfg)
        assert m.fid.num_reference == 2 and list((tmp_path / "cache" / "fid-reference").glob("*.safetensors"))
        out = m(_images(2, 1), PROMPTS[:2])
        assert set(out) == {"fid"} and out["fid"] == out["fid"]
        # a second run finds the reference statistics in the cache instead of recomputing them
        with mock.patch("torchmetrics.image.fid.FrechetInceptionDistance.update", side_effect=AssertionError):
            again = FID(cfg, torch.device("cpu"))
        assert torch.equal(again.metric.real_features_sum, m.fid.metric.real_features_sum)


def test_fid_behaviour_and_reference_on_fsspec(tiny, tmp_path):
    import fsspec

    # reference images on another fsspec filesystem
    mem = fsspec.filesystem("memory")
    for p in reference_image_urls(tiny["reference_images"]):
        mem.pipe(f"/refs-{tmp_path.name}/{p.rsplit('/', 1)[-1]}", open(p, "rb").read())
    url = f"memory://refs-{tmp_path.name}"
    assert len(reference_image_urls(url)) == 6
    cfg = MetricsConfig(**{**tiny, "reference_images": url, "run": ["fid"]})
    m = RealMetrics(cfg, fid_feature=TinyFeatures())
    refs = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in reference_image_urls(tiny["reference_images"])]).float() / 255
    same = m(refs, ["x"] * 6)["fid"]
    other = m(torch.rand(6, 3, 30, 40, generator=torch.Generator().manual_seed(9)) * 0.5, ["x"] * 6)["fid"]
    assert same < 1e-3 < other


def test_fid_preprocessing_is_pinned():
    img = Image.fromarray((torch.rand(30, 40, 3, generator=torch.Generator().manual_seed(0)) * 255)
                          .to(torch.uint8).numpy())
    x = fid_preprocess(img)
    assert x.shape == (3, 299, 299) and x.dtype == torch.uint8
    expect = img.crop((5, 0, 35, 30)).resize((299, 299), Image.BICUBIC)
    assert torch.equal(x, torch.from_numpy(np.array(expect)).permute(2, 0, 1))


def test_captions(tmp_path):
    (tmp_path / "c.txt").write_text("# comment\na red circle\n\na blue square\n")
    assert load_captions(str(tmp_path / "c.txt")) == ["a red circle", "a blue square"]
    coco = {"annotations": [{"image_id": 9, "id": 1, "caption": "second  image "},
                            {"image_id": 3, "id": 5, "caption": "first image, later caption"},
                            {"image_id": 3, "id": 2, "caption": "first image"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(coco))
    assert load_captions(str(tmp_path / "captions_val2017.json")) == ["first image", "second image"]


def test_errors_say_what_to_install_or_download(tiny, tmp_path, monkeypatch):
    with pytest.raises(MetricsError, match="pinned to the LAION predictor file sac"):
        RealMetrics(MetricsConfig(**{**tiny, "aesthetic_weights": str(tmp_path / "other.pth"), "run": ["aesthetic"]}))
    missing = str(tmp_path / AESTHETIC_FILE)
    with pytest.raises(MetricsError, match=r"Download sac\+logos\+ava1-l14-linearMSE.pth .*aesthetic_weights=/path"):
        RealMetrics(MetricsConfig(**{**tiny, "aesthetic_weights": missing, "run": ["aesthetic"]}))
    with pytest.raises(MetricsError, match="Download ImageReward.pt and med_config.json .* THUDM/ImageReward"):
        RealMetrics(MetricsConfig(**{**tiny, "imagereward_weights": str(tmp_path / "nope.pt"), "run": ["imagereward"]}))
    with pytest.raises(MetricsError, match="set evaluate.metrics.reference_images"):
        RealMetrics(MetricsConfig(**{**tiny, "reference_images": None, "run": ["fid"]}))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MetricsError, match="weights-inception-2015-12-05-6726825d.pth and set "
                                           "evaluate.metrics.fid_inception_weights"):
        RealMetrics(MetricsConfig(**{**tiny, "run": ["fid"]}))
    import open_clip

    def offline(*a, **k):
        raise OSError("cannot reach the hub")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(MetricsError, match="from the hub repo laion/CLIP-ViT-g-14-laion2B-s12B-b42K and set "
                                           "evaluate.metrics.clip_pretrained="):
        RealMetrics(MetricsConfig(run=["clip"]))  # the default ViT-g-14 weights, hub unreachable
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MetricsError, match="pip install open-clip-torch"):
        RealMetrics(MetricsConfig(**{**tiny, "run": ["clip"]}))
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(MetricsError, match="pip install torch-fidelity"):
        RealMetrics(MetricsConfig(**{**tiny, "run": ["fid"]}))


def test_evaluate_writes_a_table1_row(tiny, tmp_path, monkeypatch):
    """evaluate.metrics.kind=real on the tiny teacher: captions as prompts, Table 1 columns in JSON/Markdown/table."""
    from tiny_lora import base_path, trained_lora

    import tlcm_core.metrics as metrics_mod
    from tlcm_core.config import load_config
    from tlcm_core.evaluation import evaluate_rows, markdown_table
    from tlcm_core.progress import SilentReporter

    (tmp_path / "captions.txt").write_text("\n".join(PROMPTS) + "\n")
    monkeypatch.setattr(metrics_mod, "RealMetrics", functools.partial(RealMetrics, fid_feature=TinyFeatures()))
    overrides = [f"teacher.source={base_path()}", "lora.rank=4", "lora.alpha=8", "evaluate.num_samples=4",
                 "evaluate.batch_size=4", "evaluate.grid_size=0", "evaluate.metrics.kind=real",
                 f"evaluate.metrics.captions={tmp_path / 'captions.txt'}"]
    overrides += [f"evaluate.metrics.{k}={v}" for k, v in tiny.items() if v is not None]
    cfg = load_config("toy-fast", overrides)
    rows = evaluate_rows(cfg, trained_lora()[0], [2], SilentReporter())
    assert [(r["method"], r["steps"]) for r in rows] == [("tlcm-renoise", 2)]
    assert {"seconds_per_image", "fid", "clip_score", "aesthetic_score", "image_reward"} <= set(rows[0])
    md = markdown_table(rows)
    assert md.splitlines()[0] == "| method | steps | time/img (s) | FID | CS | AS | IR |"
