"""The field's text-to-image metrics, as TLCM's Table 1 reports them (evaluate.metrics, config.MetricsConfig).

  clip_score       CS: 100 x cos(image, caption) with open_clip ViT-g-14 laion2b_s12b_b42k, mean over images
                   (negative cosines count as 0, as torchmetrics' CLIPScore)
  aesthetic_score  AS: the LAION improved aesthetic predictor: the MLP `sac+logos+ava1-l14-linearMSE.pth` (file name
                   pinned) on L2-normalised OpenAI CLIP ViT-L/14 image embeddings (open_clip ViT-L-14-quickgelu,
                   "openai": the OpenAI weights need QuickGELU)
  image_reward     IR: ImageReward v1.0 (tlcm_core.imagereward: the package itself no longer imports)
  fid              FID against a folder of reference images (COCO-2017 val in real use): torchmetrics'
                   FrechetInceptionDistance on torch-fidelity's InceptionV3 pool3 features (the TF-ported FID weights
                   weights-inception-2015-12-05-6726825d.pth). Pinned preprocessing, the same for generated and
                   reference images: centre-crop to a square, PIL bicubic resize to 299x299 (clean-fid's "clean"
                   resize), uint8; the extractor's own resize is then the identity.
                   With evaluate.metrics.fid_reference=teacher the reference set is the teacher's own
                   fid_teacher_steps-step (25) samples of the same prompts and noise instead (row key `fid_teacher`:
                   the distance to the teacher; no real images needed).
  hpsv2            HPSv2: 100 x cos(image, caption) with open_clip ViT-H-14 fine-tuned on HPD v2 (hub xswu/HPSv2,
                   HPS_v2.1_compressed.pt by default; HPS_v2_compressed.pt is v2.0) and HPSv2's own preprocessing
                   (hpsv2_preprocess: the longest side to 224 + zero padding, not CLIP's short side + centre crop)
  pickscore        PickScore: exp(logit_scale) x cos(image, caption) with the transformers CLIPModel
                   yuvalkirstain/PickScore_v1 (CLIP-ViT-H-14 fine-tuned on Pick-a-Pic) and the processor it was
                   trained with (laion/CLIP-ViT-H-14-laion2B-s32B-b79K; pickscore_preprocess)

Each metric's preprocessing is its reference implementation's on PIL images (CLIP: bicubic resize of the short
side to 224 + centre crop + CLIP normalisation), so scores compare with published numbers. Images reach a metric
as (B, 3, H, W) floats in [0, 1] and are quantised to uint8 PIL images first, like a saved PNG.

Weights are local paths, fsspec URLs (`hf://org/repo/file` reaches the hub through huggingface_hub's filesystem;
fetched files are cached under $TLCM_CACHE/weights) or, for open_clip, its pretrained tags. A missing package or
file raises MetricsError saying exactly what to install or download and which config field to set.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from .config import MetricsConfig
from .errors import UserError

AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's TF-ported FID InceptionV3
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
FID_SIZE = 299
FID_PREPROCESSING = "center-crop-square,pil-bicubic-299,uint8"  # part of the reference-statistics cache key
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METRIC_KEYS = {"clip": "clip_score", "aesthetic": "aesthetic_score", "imagereward": "image_reward", "fid": "fid",
               "hpsv2": "hpsv2", "pickscore": "pickscore"}
# OpenAI CLIP's normalisation, which HPSv2 (its open_clip fork's default) and PickScore (its processor) both use
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HPSV2_SIZE = 224  # ViT-H-14's input; both scorers are pinned to it, as their releases were trained and reported
PICKSCORE_SIZE = 224


class MetricsError(UserError, RuntimeError):
    """A metric cannot run: the message says what to install or download and which config field to set."""


def _cache_dir() -> Path:
    return Path(os.environ.get("TLCM_CACHE", Path.home() / ".cache" / "tlcm"))


def _need(module: str, pip: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MetricsError(f"{what} needs the `{pip}` package: pip install {pip}  (or pip install 'tlcm[metrics]')") \
            from None


def fetch(ref: str, what: str, how: str) -> str:
    """A local path for a weights/config file given as a path or an fsspec URL (downloaded once into the cache)."""
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    if "://" not in ref:
        if Path(ref).is_file():
            return ref
        raise MetricsError(f"{what}: no file at {ref!r}. {how}")
    dest = _cache_dir() / "weights" / hashlib.sha256(ref.encode()).hexdigest()[:16] / ref.rstrip("/").rsplit("/", 1)[-1]
    if dest.is_file():
        return str(dest)
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(ref)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        fs.get_file(path, str(tmp))
        os.replace(tmp, dest)
    except Exception as e:  # unreachable hub, missing file, missing fsspec backend
        raise MetricsError(f"{what}: cannot fetch {ref!r} ({type(e).__name__}: {str(e)[:200]}). {how}") from None
    return str(dest)


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> uint8 RGB PIL images (as the pipeline's PNGs)."""
    from PIL import Image

    from .models import images_uint8

    return [Image.fromarray(a) for a in images_uint8(images)]


# ---------------------------------------------------------------------------------------------------------------------
# Captions and reference images


def load_captions(url: str) -> list[str]:
    """Evaluation captions: a UTF-8 text file (one a line) or COCO captions JSON (captions_val2017.json), from which
    the first caption of each image, in image-id order, is taken (5000 for COCO-2017 val)."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise MetricsError(f"evaluate.metrics.captions={url!r}: not found") from None
    if url.endswith(".json"):
        data = json.loads(raw)
        if not isinstance(data, dict) or "annotations" not in data:
            raise MetricsError(f"{url}: a .json captions file must be COCO captions (a dict with 'annotations')")
        first: dict[int, str] = {}
        for a in sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
            first.setdefault(a["image_id"], " ".join(a["caption"].split()))
        captions = [first[k] for k in sorted(first)]
    else:
        captions = [ln.strip() for ln in raw.decode("utf-8-sig").splitlines()]
        captions = [c for c in captions if c and not c.startswith("#")]
    if not captions:
        raise MetricsError(f"{url}: no captions")
    return captions


def reference_image_urls(url: str) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    try:
        files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_SUFFIXES))
    except FileNotFoundError:
        files = []
    if not files:
        raise MetricsError(f"evaluate.metrics.reference_images={url!r}: no images ({', '.join(IMAGE_SUFFIXES)}) "
                           "there; point it at a folder of real images (e.g. COCO-2017 val2017/)")
    return [fs.unstrip_protocol(p) if "://" in url else p for p in files]


def fid_preprocess(image) -> torch.Tensor:
    """The pinned FID preprocessing: centre square crop, PIL bicubic resize to 299, uint8 (3, 299, 299)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    image = image.crop((left, top, left + s, top + s)).resize((FID_SIZE, FID_SIZE), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------------------
# CLIP score and aesthetic score (open_clip)


def load_open_clip(model: str, pretrained: str | None, field: str, device):
    open_clip = _need("open_clip", "open-clip-torch", f"evaluate.metrics.{field}")
    if pretrained and ("://" in pretrained) and not pretrained.startswith("file://"):
        pretrained = fetch(pretrained, f"evaluate.metrics.{field}_pretrained", "Download the open_clip weights file "
                           f"and set evaluate.metrics.{field}_pretrained to its path.")
    elif pretrained and pretrained.startswith("file://"):
        pretrained = pretrained[len("file://"):]
    try:
        tag = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
        # OpenAI's weights need QuickGELU; open_clip only warns when the architecture name lacks -quickgelu
        net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained or None,
                                                                   device=device,
                                                                   force_quick_gelu=bool(tag.get("quick_gelu")))
    except Exception as e:
        hint = ""
        try:
            cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
            if cfg.get("hf_hub"):
                hint = (f" Download open_clip_pytorch_model.bin (or open_clip_model.safetensors) from the hub repo "
                        f"{cfg['hf_hub'].rstrip('/')} and set evaluate.metrics.{field}_pretrained=/path/to/that file"
                        " (or fill the Hugging Face cache and set HF_HUB_OFFLINE=1).")
        except Exception:
            pass
        raise MetricsError(f"evaluate.metrics.{field}: open_clip could not build {model!r} with weights "
                           f"{pretrained!r}: {type(e).__name__}: {str(e)[:300]}.{hint}") from None
    return net.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(model)


class CLIPScore:
    """CS = 100 x max(cos(image, caption), 0) per image (open_clip; ViT-g-14 laion2b_s12b_b42k by default)."""

    def __init__(self, cfg: MetricsConfig, device):
        self.device = device
        self.model, self.preprocess, self.tokenizer = load_open_clip(cfg.clip_model, cfg.clip_pretrained, "clip",
                                                                     device)

    @torch.no_grad()
    def __call__(self, pil: list, prompts: list[str]) -> torch.Tensor:
        x = torch.stack([self.preprocess(im) for im in pil]).to(self.device)
        img = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(),
                                            dim=-1)
        return 100 * (img * txt).sum(-1).clamp(min=0)


class AestheticScore:
    """LAION improved aesthetic predictor: MLP(normalised CLIP ViT-L/14 image embedding)."""

    def __init__(self, cfg: MetricsConfig, device):
        from .imagereward import _RewardMLP

        if Path(cfg.aesthetic_weights.rstrip("/")).name != AESTHETIC_FILE:
            raise MetricsError(f"evaluate.metrics.aesthetic_weights={cfg.aesthetic_weights!r}: the aesthetic score is "
                               f"pinned to the LAION predictor file {AESTHETIC_FILE}; point the field at that file")
        path = fetch(cfg.aesthetic_weights, "evaluate.metrics.aesthetic_weights",
                     f"Download {AESTHETIC_FILE} from the improved-aesthetic-predictor repository "
                     "(github.com/christophschuhmann/improved-aesthetic-predictor) and set "
                     f"evaluate.metrics.aesthetic_weights=/path/to/{AESTHETIC_FILE}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MetricsError(f"{path}: not a plain state dict of the aesthetic MLP ({type(e).__name__}: {e})") \
                from None
        self.model, self.preprocess, _ = load_open_clip(cfg.aesthetic_clip_model, cfg.aesthetic_clip_pretrained,
                                                        "aesthetic_clip", device)
        width = state.get("layers.0.weight", torch.empty(0, 0)).shape[-1]
        self.mlp = _RewardMLP(width)
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as e:
            raise MetricsError(f"{path}: does not fit the aesthetic MLP (Linear 768-1024-128-64-16-1): {e}") from None
        self.mlp = self.mlp.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def __call__(self, pil: list, prompts: list[str]) -> torch.Tensor:
        x = torch.stack([self.preprocess(im) for im in pil]).to(self.device)
        emb = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
        return self.mlp(emb).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# ImageReward


class ImageRewardScore:
    def __init__(self, cfg: MetricsConfig, device):
        from torchvision import transforms as T

        from .imagereward import CLIP_MEAN, CLIP_STD, ImageRewardModel, init_tokenizer, load_med_config

        how = ("Download ImageReward.pt and med_config.json from the hub repo THUDM/ImageReward and set "
               "evaluate.metrics.imagereward_weights / imagereward_med_config to their paths")
        path = fetch(cfg.imagereward_weights, "evaluate.metrics.imagereward_weights", how)
        med = fetch(cfg.imagereward_med_config, "evaluate.metrics.imagereward_med_config", how)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MetricsError(f"{path}: not loadable as a plain state dict with weights_only=True "
                               f"({type(e).__name__}: {str(e)[:200]})") from None
        try:
            self.model = ImageRewardModel.from_state_dict(state, load_med_config(Path(med).read_bytes())).to(device)
        except ValueError as e:
            raise MetricsError(f"{path}: {e}") from None
        try:
            self.tokenizer = init_tokenizer(cfg.imagereward_tokenizer)
        except Exception as e:
            raise MetricsError(f"evaluate.metrics.imagereward_tokenizer={cfg.imagereward_tokenizer!r}: cannot load the "
                               f"BERT tokenizer ({type(e).__name__}). Download the bert-base-uncased tokenizer files "
                               "(vocab.txt, tokenizer_config.json) into a folder and set the field to it") from None
        n = self.model.image_size
        # ImageReward's own transform (its _transform(224)), on PIL images
        self.preprocess = T.Compose([T.Resize(n, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(n),
                                     T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        self.device = device

    @torch.no_grad()
    def __call__(self, pil: list, prompts: list[str]) -> torch.Tensor:
        from .imagereward import MAX_TEXT_LENGTH

        x = torch.stack([self.preprocess(im.convert("RGB")) for im in pil]).to(self.device)
        t = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH,
                           return_tensors="pt")
        return self.model(x, t.input_ids.to(self.device), t.attention_mask.to(self.device))


# ---------------------------------------------------------------------------------------------------------------------
# HPSv2 and PickScore (human-preference models, both CLIP ViT-H-14 fine-tunes)


def hpsv2_preprocess(image) -> torch.Tensor:
    """HPSv2's evaluation transform (its open_clip fork's preprocess_val, built with resize_longest_max=True): RGB,
    ToTensor (floats in [0, 1]), bicubic resize of the *longest* side to 224 on the tensor (antialias on, torchvision
    >= 0.17's default for tensors), zero padding to 224 x 224 (left/top get the smaller half), then OpenAI CLIP's
    mean/std. A square image is simply resized to 224 x 224. (3, 224, 224) float32."""
    from torchvision.transforms import functional as TF

    x = TF.to_tensor(image.convert("RGB"))
    h, w = x.shape[1:]
    scale = HPSV2_SIZE / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        x = TF.resize(x, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    ph, pw = HPSV2_SIZE - nh, HPSV2_SIZE - nw
    x = TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
    return TF.normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def pickscore_preprocess(image) -> torch.Tensor:
    """PickScore's processor (the CLIPImageProcessor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, on PIL images as it
    ran when PickScore was published): RGB, PIL bicubic resize of the *shortest* side to 224 (the other side
    int(224 x long / short)), centre crop 224 x 224 (offsets (size - 224) // 2), x / 255, OpenAI CLIP's mean/std.
    (3, 224, 224) float32."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    n = PICKSCORE_SIZE
    nw, nh = (n, int(n * h / w)) if w <= h else (int(n * w / h), n)
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - n) // 2, (nh - n) // 2
    x = torch.from_numpy(np.asarray(image.crop((left, top, left + n, top + n)), dtype=np.float32) / 255)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    return ((x - mean) / std).permute(2, 0, 1).contiguous()


def _square_size(size) -> int | None:
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return size[0] if len(size) == 2 and size[0] == size[1] else None


class HPSv2Score:
    """HPSv2 = 100 x cos(image, caption) (the HPSv2 benchmark's scale; its `score()` returns the bare cosine): open_clip
    `hpsv2_model` (ViT-H-14) with the HPSv2 checkpoint `hpsv2_weights` ({"state_dict": ...}, loaded with
    weights_only=True), images through hpsv2_preprocess, captions through open_clip's tokenizer (77 tokens)."""

    def __init__(self, cfg: MetricsConfig, device):
        open_clip = _need("open_clip", "open-clip-torch", "evaluate.metrics.run=[hpsv2]")
        try:  # the architecture only: the weights are the HPSv2 file's (a local-dir: model's own are replaced)
            model = open_clip.create_model(cfg.hpsv2_model, pretrained=None, device="cpu")
        except Exception as e:
            raise MetricsError(f"evaluate.metrics.hpsv2_model={cfg.hpsv2_model!r}: open_clip cannot build it "
                               f"({type(e).__name__}: {str(e)[:200]}); HPSv2 is ViT-H-14") from None
        size = getattr(model.visual, "image_size", None)
        if _square_size(size) != HPSV2_SIZE:
            raise MetricsError(f"evaluate.metrics.hpsv2_model={cfg.hpsv2_model!r} takes {size} px images, but HPSv2 is "
                               f"pinned to {HPSV2_SIZE} x {HPSV2_SIZE} (ViT-H-14, as released); use ViT-H-14")
        path = fetch(cfg.hpsv2_weights, "evaluate.metrics.hpsv2_weights",
                     "Download HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt for v2.0) from the hub repo xswu/HPSv2 "
                     "and set evaluate.metrics.hpsv2_weights=/path/to/it")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MetricsError(f"{path}: not loadable as a plain checkpoint with weights_only=True "
                               f"({type(e).__name__}: {str(e)[:200]}); refusing to unpickle it") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise MetricsError(f"{path}: not an HPSv2 checkpoint for open_clip {cfg.hpsv2_model} "
                               f"({type(e).__name__}: {str(e)[:300]})") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(cfg.hpsv2_model)
        self.device = device

    @torch.no_grad()
    def __call__(self, pil: list, prompts: list[str]) -> torch.Tensor:
        x = torch.stack([hpsv2_preprocess(im) for im in pil]).to(self.device)
        img = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(),
                                            dim=-1)
        return 100 * (img * txt).sum(-1)


def hf_source(ref: str, field: str, how: str) -> str:
    """A hub id or local folder for from_pretrained; an fsspec URL of a folder is downloaded once into the cache."""
    if ref.startswith("file://"):
        return ref[len("file://"):]
    if "://" not in ref:
        return ref
    dest = _cache_dir() / "models" / hashlib.sha256(ref.encode()).hexdigest()[:16]
    if not (dest / "config.json").is_file() and not (dest / "preprocessor_config.json").is_file():
        import tempfile

        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(ref)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent))
            fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
            os.replace(tmp, dest)
        except Exception as e:
            raise MetricsError(f"evaluate.metrics.{field}={ref!r}: cannot fetch it ({type(e).__name__}: "
                               f"{str(e)[:200]}). {how}") from None
    return str(dest)


# what PickScore's processor must say for pickscore_preprocess to be its preprocessing
_PICKSCORE_PROCESSOR = {"do_resize": True, "size": {"shortest_edge": PICKSCORE_SIZE}, "resample": 3,
                        "do_center_crop": True, "crop_size": {"height": PICKSCORE_SIZE, "width": PICKSCORE_SIZE},
                        "do_rescale": True, "do_normalize": True}


def _size(v) -> dict:
    """transformers 4 keeps sizes as dicts, 5 as SizeDict dataclasses with unset fields None."""
    import dataclasses

    v = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else dict(v or {})
    return {k: x for k, x in v.items() if x is not None}


def _check_pickscore_processor(ip, ref: str) -> None:
    seen = {k: getattr(ip, k, None) for k in _PICKSCORE_PROCESSOR}
    seen["size"], seen["crop_size"] = _size(seen["size"]), _size(seen["crop_size"])
    seen["resample"] = int(seen["resample"]) if seen["resample"] is not None else None
    bad = {k: v for k, v in seen.items() if v != _PICKSCORE_PROCESSOR[k]}
    if abs(float(getattr(ip, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        bad["rescale_factor"] = ip.rescale_factor
    for k, want in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        got = list(getattr(ip, k, None) or [])
        if len(got) != 3 or max(abs(a - b) for a, b in zip(got, want)) > 1e-6:
            bad[k] = got
    if bad:
        raise MetricsError(f"evaluate.metrics.pickscore_processor={ref!r}: its image settings {bad} are not "
                           f"PickScore's pinned preprocessing ({PICKSCORE_SIZE} px shortest side, bicubic, "
                           f"{PICKSCORE_SIZE} x {PICKSCORE_SIZE} centre crop, OpenAI CLIP mean/std); use "
                           "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


class PickScore:
    """PickScore = exp(logit_scale) x cos(image, caption) of the transformers CLIPModel `pickscore_model`, images
    through pickscore_preprocess, captions through the processor's tokenizer (padding to the longest, truncation at
    77)."""

    def __init__(self, cfg: MetricsConfig, device):
        transformers = _need("transformers", "transformers", "evaluate.metrics.run=[pickscore]")
        how = ("Download the hub repos yuvalkirstain/PickScore_v1 (the model) and "
               "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (its processor) and set evaluate.metrics.pickscore_model / "
               "pickscore_processor to the folders (or fill the Hugging Face cache and set HF_HUB_OFFLINE=1)")
        transformers.utils.logging.disable_progress_bar()  # loading bars say nothing useful in a pipeline log
        loaded = []
        for field, cls in (("pickscore_model", transformers.CLIPModel), ("pickscore_processor",
                                                                           transformers.AutoProcessor)):
            ref = getattr(cfg, field)
            try:
                loaded.append(cls.from_pretrained(hf_source(ref, field, how)))
            except MetricsError:
                raise
            except Exception as e:
                raise MetricsError(f"evaluate.metrics.{field}={ref!r}: cannot load it ({type(e).__name__}: "
                                   f"{str(e)[:200]}). {how}") from None
        model, processor = loaded
        size = model.config.vision_config.image_size
        if _square_size(size) != PICKSCORE_SIZE:
            raise MetricsError(f"evaluate.metrics.pickscore_model={cfg.pickscore_model!r} takes {size} px images, but "
                               f"PickScore is pinned to {PICKSCORE_SIZE} x {PICKSCORE_SIZE} (CLIP-ViT-H-14, as "
                               "released)")
        _check_pickscore_processor(processor.image_processor, cfg.pickscore_processor)
        self.model, self.tokenizer = model.to(device).eval().requires_grad_(False), processor.tokenizer
        self.device = device

    @torch.no_grad()
    def __call__(self, pil: list, prompts: list[str]) -> torch.Tensor:
        m = self.model
        x = torch.stack([pickscore_preprocess(im) for im in pil]).to(self.device, m.dtype)
        t = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        # the projections of the pooled outputs, i.e. get_image_features / get_text_features (whose return type
        # differs between transformers 4 and 5)
        img = m.visual_projection(m.vision_model(pixel_values=x).pooler_output)
        txt = m.text_projection(m.text_model(input_ids=t.input_ids.to(self.device),
                                             attention_mask=t.attention_mask.to(self.device)).pooler_output)
        cos = (torch.nn.functional.normalize(img.float(), dim=-1) * torch.nn.functional.normalize(txt.float(), dim=-1))
        return m.logit_scale.exp().float() * cos.sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# FID


def _safe_inception_path(cfg: MetricsConfig) -> str:
    """The InceptionV3 weights file, checked to be a plain state dict (weights_only=True) before torch-fidelity
    loads it (it calls torch.load with weights_only=False)."""
    how = (f"Download {INCEPTION_URL} and set evaluate.metrics.fid_inception_weights=/path/to/it (torch-fidelity "
           "would fetch it itself, which needs internet)")
    if cfg.fid_inception_weights:
        path = fetch(cfg.fid_inception_weights, "evaluate.metrics.fid_inception_weights", how)
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[-1]
        if not cached.is_file():
            raise MetricsError(f"FID: no InceptionV3 weights (looked in {cached}). {how}")
        path = str(cached)
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MetricsError(f"{path}: not a plain InceptionV3 state dict ({type(e).__name__}); refusing to unpickle it")\
            from None
    return path


class FID:
    """Frechet Inception Distance of generated images against the reference folder; reference statistics are
    computed once (and cached on disk per folder listing + weights file + preprocessing). With fid_reference=teacher
    the reference set is whatever `update_reference` is given (evaluate_rows: the teacher's samples), not cached;
    stage teacher-evaluate keeps its statistics (reference_state) for the student's rows."""

    REFERENCE_STATE = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")

    def __init__(self, cfg: MetricsConfig, device, feature: torch.nn.Module | None = None):
        """`feature` replaces InceptionV3 by another uint8-image feature extractor (tests); its reference statistics
        are not cached."""
        self.teacher_reference = cfg.fid_reference == "teacher"
        if not cfg.reference_images and not self.teacher_reference:
            raise MetricsError("FID needs reference images: set evaluate.metrics.reference_images to a folder (any "
                               "fsspec URL) of real images, e.g. COCO-2017 val2017/, or measure against the teacher's "
                               "own samples with evaluate.metrics.fid_reference=teacher, or drop 'fid' from "
                               "evaluate.metrics.run")
        fid_mod = _need("torchmetrics.image.fid", "torchmetrics", "FID")
        if feature is None:
            _need("torch_fidelity", "torch-fidelity", "FID (the InceptionV3 feature extractor)")
            self.weights = _safe_inception_path(cfg)
            self.metric = fid_mod.FrechetInceptionDistance(feature=2048, reset_real_features=False, normalize=False,
                                                           feature_extractor_weights_path=self.weights,
                                                           antialias=False).to(device)
        else:
            self.weights = None
            self.metric = fid_mod.FrechetInceptionDistance(feature=feature, reset_real_features=False,
                                                           normalize=False).to(device)
        self.device, self.batch_size, self.num_reference = device, cfg.batch_size, 0
        if not self.teacher_reference:
            self._load_reference(cfg.reference_images)

    def _load_reference(self, url: str) -> None:
        import fsspec
        from PIL import Image

        files = reference_image_urls(url)
        fs = fsspec.core.url_to_fs(url)[0]
        cache = None
        if self.weights is not None:
            listing = [(f, fs.size(f)) for f in files]
            key = hashlib.sha256(json.dumps([url, listing, Path(self.weights).stat().st_size, FID_PREPROCESSING])
                                 .encode()).hexdigest()[:20]
            cache = _cache_dir() / "fid-reference" / f"{key}.safetensors"
        if cache is not None and cache.is_file():
            from safetensors.torch import load_file

            self.load_reference_state(load_file(str(cache)))
            return
        for i in range(0, len(files), self.batch_size):
            batch = []
            for f in files[i:i + self.batch_size]:
                with fs.open(f, "rb") as fh:
                    batch.append(fid_preprocess(Image.open(io.BytesIO(fh.read()))))
            self.metric.update(torch.stack(batch).to(self.device), real=True)
        self.num_reference = len(files)
        if cache is not None:
            from safetensors.torch import save_file

            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file(self.reference_state(), str(cache))

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The reference set's statistics (torchmetrics' sums, float64): what FID needs of the reference images."""
        return {n: getattr(self.metric, n).detach().cpu().contiguous() for n in self.REFERENCE_STATE}

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore reference_state(): FID against those images, without them."""
        for n in self.REFERENCE_STATE:
            setattr(self.metric, n, state[n].to(self.device))
        self.num_reference = int(state["real_features_num_samples"])

    def reset(self) -> None:
        self.metric.reset()  # generated-image statistics only (reset_real_features=False)

    @torch.no_grad()
    def update(self, pil: list) -> None:
        self.metric.update(torch.stack([fid_preprocess(im) for im in pil]).to(self.device), real=False)

    @torch.no_grad()
    def update_reference(self, pil: list) -> None:
        """Add images to the reference set (fid_reference=teacher), through the same pinned preprocessing."""
        self.metric.update(torch.stack([fid_preprocess(im) for im in pil]).to(self.device), real=True)
        self.num_reference += len(pil)

    def compute(self) -> float:
        if self.num_reference < 2:
            raise MetricsError(f"FID has {self.num_reference} reference image(s), it needs at least 2"
                               + (": with evaluate.metrics.fid_reference=teacher the teacher's samples are the "
                                  "reference and must be given first (evaluate_rows samples them first)"
                                  if self.teacher_reference else ""))
        return float(self.metric.compute())


# ---------------------------------------------------------------------------------------------------------------------
# All of them


class RealMetrics:
    """Table 1's metrics for one row of images. Stream a row with reset/update/compute, or call it on all at once
    (`metrics(images, prompts) -> {"clip_score", "aesthetic_score", "image_reward", "fid", ...}`, as ToyMetrics);
    the keys are METRIC_KEYS of evaluate.metrics.run, with "fid_teacher" for FID when fid_reference=teacher."""

    def __init__(self, cfg: MetricsConfig, device: torch.device | str = "cpu",
                 fid_feature: torch.nn.Module | None = None):
        self.cfg, self.device = cfg, torch.device(device)
        self.scorers = {}
        if "clip" in cfg.run:
            self.scorers["clip_score"] = CLIPScore(cfg, self.device)
        if "aesthetic" in cfg.run:
            self.scorers["aesthetic_score"] = AestheticScore(cfg, self.device)
        if "imagereward" in cfg.run:
            self.scorers["image_reward"] = ImageRewardScore(cfg, self.device)
        if "hpsv2" in cfg.run:
            self.scorers["hpsv2"] = HPSv2Score(cfg, self.device)
        if "pickscore" in cfg.run:
            self.scorers["pickscore"] = PickScore(cfg, self.device)
        self.fid = FID(cfg, self.device, fid_feature) if "fid" in cfg.run else None
        self.reset()

    def reset(self) -> None:
        self._sums = {k: 0.0 for k in self.scorers}
        self._n = 0
        if self.fid is not None:
            self.fid.reset()

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        bs = self.cfg.batch_size
        for i in range(0, len(images), bs):
            pil, ps = to_pil(images[i:i + bs]), list(prompts[i:i + bs])
            for key, scorer in self.scorers.items():
                self._sums[key] += float(scorer(pil, ps).double().sum())
            if self.fid is not None:
                self.fid.update(pil)
        self._n += len(images)

    def update_reference(self, images: torch.Tensor) -> None:
        """FID's reference images when evaluate.metrics.fid_reference=teacher (the teacher's samples); kept across
        `reset`, which clears only the generated images' statistics."""
        if self.fid is None or not self.fid.teacher_reference:
            raise ValueError("update_reference needs 'fid' in evaluate.metrics.run and fid_reference=teacher")
        for i in range(0, len(images), self.cfg.batch_size):
            self.fid.update_reference(to_pil(images[i:i + self.cfg.batch_size]))

    def reference_state(self) -> dict[str, torch.Tensor]:
        """FID's reference statistics (fid_reference=teacher: the teacher's samples given to update_reference), to
        measure later rows against with load_reference_state; identical numbers, none of the images."""
        if self.fid is None:
            raise ValueError("reference_state needs 'fid' in evaluate.metrics.run")
        return self.fid.reference_state()

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.fid is None:
            raise ValueError("load_reference_state needs 'fid' in evaluate.metrics.run")
        self.fid.load_reference_state(state)

    @property
    def fid_key(self) -> str:
        return "fid_teacher" if self.fid is not None and self.fid.teacher_reference else "fid"

    def compute(self) -> dict:
        if self._n == 0:
            raise ValueError("no images were scored")
        out = {k: round(v / self._n, 4) for k, v in self._sums.items()}
        if self.fid is not None:
            if self._n < 2:
                raise ValueError("FID needs at least 2 generated images")
            out[self.fid_key] = round(self.fid.compute(), 3)
        return out

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict:
        self.reset()
        self.update(images, prompts)
        return self.compute()


__all__ = ["AESTHETIC_FILE", "FID", "FID_PREPROCESSING", "HPSV2_SIZE", "HPSv2Score", "INCEPTION_FILE", "MetricsError",
           "PICKSCORE_SIZE", "PickScore", "RealMetrics", "fid_preprocess", "hpsv2_preprocess", "load_captions",
           "pickscore_preprocess", "reference_image_urls", "to_pil"]
