"""Latent LPIPS: the VGG surgery, the LPIPS math against the `lpips` package, weight files (good, lpips-named,
VGG-numbered, wrong shape, missing keys, pickles), BAPPS 2AFC training on a synthetic set, and the data-free
regression on a tiny SDXL-shaped pipeline's VAE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tlcm_core.losses import consistency_loss, make_distance
from tlcm_core.losses.latent_lpips import (LatentLPIPS, LatentLPIPSWeightsError, load_latent_lpips, map_state_dict,
                                           save_latent_lpips)

SMALL = 0.125  # the CPU-sized width of the toy world


@pytest.fixture(scope="module")
def small() -> LatentLPIPS:
    torch.manual_seed(0)
    m = LatentLPIPS(width=SMALL).eval()
    with torch.no_grad():  # distinct, non-negative heads so that a mis-mapped head would show
        for k, lin in enumerate(m.lins):
            lin.model[1].weight.uniform_(0.0, 1.0 + k)
    return m


@pytest.fixture(scope="module")
def pixel_lpips():
    import lpips

    torch.manual_seed(1)
    return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> str:
    from tlcm_core.toy.pipeline import build_toy_pipeline

    path = tmp_path_factory.mktemp("teacher") / "tiny-sdxl"
    build_toy_pipeline(seed=3).save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# The network


def test_vgg_surgery_shapes_at_sdxl_latents():
    """Full width at 4x128x128 (SDXL 1024 px): three pools removed -> 128x128 for slices 1-4, the fourth pool
    halves slice 5; channels as VGG-16's relu1_2 .. relu5_3."""
    torch.manual_seed(0)
    m = LatentLPIPS().eval()
    assert m.net.slice1[0].in_channels == 4
    pools = [[type(x).__name__ for x in getattr(m.net, f"slice{k}")].count("MaxPool2d") for k in range(1, 6)]
    assert pools == [0, 0, 0, 0, 1]
    assert sum(p.numel() for p in m.net.parameters()) == 14_714_688 + 64 * 9  # VGG-16 features + a 4th input
    with torch.no_grad():
        feats = m.net(torch.randn(1, 4, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 128, 128), (1, 128, 128, 128), (1, 256, 128, 128),
                                               (1, 512, 128, 128), (1, 512, 64, 64)]
    assert [lin.model[1].weight.shape[1] for lin in m.lins] == [64, 128, 256, 512, 512]
    assert LatentLPIPS(width=SMALL).channels == (8, 16, 32, 64, 64)


def test_lpips_math_matches_the_lpips_package(pixel_lpips):
    """Our normalization, heads and averaging equal lpips.LPIPS's when it runs on our network (no scaling layer)."""
    torch.manual_seed(2)
    ours = LatentLPIPS().eval()
    with torch.no_grad():
        for lin in ours.lins:
            lin.model[1].weight.uniform_(0, 1)
    ref = pixel_lpips
    saved = ref.net, ref.scaling_layer
    try:
        ref.net, ref.scaling_layer = ours.net, torch.nn.Identity()
        for k in range(5):
            ref.lins[k].model[1].weight = ours.lins[k].model[1].weight
        x, y = torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12)
        with torch.no_grad():
            torch.testing.assert_close(ours(x, y), ref(x, y).flatten(), rtol=1e-5, atol=1e-6)
    finally:
        ref.net, ref.scaling_layer = saved


def test_distance_properties_and_gradients(small):
    torch.manual_seed(3)
    x, y = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(small(x, x), torch.zeros(3))
        torch.testing.assert_close(small(x, y), small(y, x))
        assert bool((small(x, y) > 0).all()) and small(x, y).shape == (3,)
        assert bool((small(x, x + 0.01 * torch.randn_like(x)) < small(x, y)).all())
    # gradients reach the prediction, and stay finite where features vanish (an all-zero input)
    distance = make_distance("latent-lpips", latent_lpips=small)
    for pred, nonzero in ((torch.randn(2, 4, 16, 16), True), (torch.zeros(2, 4, 16, 16), False)):
        pred.requires_grad_(True)
        consistency_loss(pred, torch.randn(2, 4, 16, 16), distance).backward()
        assert torch.isfinite(pred.grad).all() and (not nonzero or pred.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="same shape"):
        small(x, y[:, :, :8])


# ---------------------------------------------------------------------------------------------------------------------
# Weight files


def _outputs(m):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        return m(x, y)


def test_good_files_load(small, tmp_path):
    path = tmp_path / "ours.safetensors"
    save_latent_lpips(small, path, source="test")
    loaded = load_latent_lpips(path)  # width from the metadata
    assert loaded.width == SMALL and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(_outputs(loaded), _outputs(small))
    assert torch.equal(_outputs(load_latent_lpips(f"file://{path}")), _outputs(loaded))
    # a DDP checkpoint: module. prefix inside {"state_dict": ...}, torch format
    buf = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in small.state_dict().items()}, "epoch": 3}, buf)
    torch.testing.assert_close(_outputs(load_latent_lpips(buf)), _outputs(small))


def test_plain_vgg_numbering_loads(small, tmp_path):
    """`features.N` as torchvision numbers it (pools replaced by Identity) or compacted (pools deleted)."""
    sd = small.state_dict()  # net.sliceK.IDX.param -> features.IDX.param
    tv = {(f"features.{k.split('.')[2]}.{k.split('.')[3]}" if k.startswith("net.") else k): v for k, v in sd.items()}
    assert "features.28.weight" in tv and "features.5.bias" in tv
    torch.save(tv, tmp_path / "tv.pth")
    torch.testing.assert_close(_outputs(load_latent_lpips(tmp_path / "tv.pth")), _outputs(small))
    tv_idx = sorted({int(k.split(".")[1]) for k in tv if k.startswith("features.")})
    compact = dict(zip(tv_idx, (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 21, 23, 25)))
    cp = {(f"vgg.features.{compact[int(k.split('.')[1])]}.{k.split('.')[2]}" if k.startswith("features.") else k): v
          for k, v in tv.items()}
    torch.save(cp, tmp_path / "compact.pth")
    torch.testing.assert_close(_outputs(load_latent_lpips(tmp_path / "compact.pth")), _outputs(small))


def test_lpips_package_naming(pixel_lpips, tmp_path):
    """lpips' state dict (net.slice*, lin*.model.1 and the duplicate lins.*): as is it is pixel LPIPS (3 channels,
    a scaling layer) and is refused with a clear message; with a 4-channel first conv and no scaling layer it loads."""
    sd = {k: v.clone() for k, v in pixel_lpips.state_dict().items()}
    assert "lins.0.model.1.weight" in sd and "lin0.model.1.weight" in sd
    torch.save(sd, tmp_path / "pixel.pth")
    with pytest.raises(LatentLPIPSWeightsError, match="scaling_layer"):
        load_latent_lpips(tmp_path / "pixel.pth")
    with pytest.raises(LatentLPIPSWeightsError, match=r"net\.slice1\.0\.weight.*\(64, 3, 3, 3\).*3 input channels"):
        load_latent_lpips(tmp_path / "pixel.pth", strict=False)
    sd = {k: v for k, v in sd.items() if not k.startswith("scaling_layer")}
    w = sd["net.slice1.0.weight"]
    sd["net.slice1.0.weight"] = torch.cat([w, w.mean(1, keepdim=True)], dim=1)
    for k in range(5):  # lpips' shipped heads are positive; random test heads need not be
        sd[f"lin{k}.model.1.weight"] = sd[f"lins.{k}.model.1.weight"] = sd[f"lin{k}.model.1.weight"].abs()
    torch.save(sd, tmp_path / "latent.pth")
    m = load_latent_lpips(tmp_path / "latent.pth")
    assert m.width == 1.0
    mapped, unknown = map_state_dict(sd)
    assert not unknown
    for k, v in m.state_dict().items():
        assert torch.equal(v, mapped[k]), k


def test_wrong_shape_names_key_and_shapes(small, tmp_path):
    sd = dict(small.state_dict())
    sd["net.slice3.12.weight"] = torch.zeros(32, 16, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(LatentLPIPSWeightsError) as e:
        load_latent_lpips(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "'net.slice3.12.weight'" in msg and "(32, 32, 3, 3)" in msg and "(32, 16, 3, 3)" in msg
    assert "latent-lpips.pth" in msg and "bad.pth" in msg
    # the width asked for does not fit the file
    with pytest.raises(LatentLPIPSWeightsError, match=r"'net\.slice1\.0\.weight' expects shape \(64, 4, 3, 3\)"):
        load_latent_lpips(tmp_path / "bad.pth", width=1.0)


def test_missing_keys_and_negative_heads(small, tmp_path):
    sd = {k: v for k, v in small.state_dict().items() if not k.startswith("lin3.")}
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(LatentLPIPSWeightsError, match=r"missing key 'lin3\.model\.1\.weight'"):
        load_latent_lpips(tmp_path / "missing.pth")
    torch.save({"optimizer": {"lr": torch.tensor(1.0)}, "step": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(LatentLPIPSWeightsError, match="not a state dict of tensors"):
        load_latent_lpips(tmp_path / "ckpt.pth")
    torch.save({"classifier.weight": torch.zeros(10, 4)}, tmp_path / "other.pth")
    with pytest.raises(LatentLPIPSWeightsError, match=r"not part of latent LPIPS.*classifier\.weight"):
        load_latent_lpips(tmp_path / "other.pth")
    with pytest.raises(LatentLPIPSWeightsError, match="no first convolution"):
        load_latent_lpips(tmp_path / "other.pth", strict=False)
    sd = dict(small.state_dict())
    sd["lin2.model.1.weight"] = -sd["lin2.model.1.weight"]
    torch.save(sd, tmp_path / "neg.pth")
    with pytest.raises(LatentLPIPSWeightsError, match="negative"):
        load_latent_lpips(tmp_path / "neg.pth")
    with pytest.raises(FileNotFoundError, match="latent-lpips.pth"):
        load_latent_lpips(tmp_path / "nowhere.pth")


_UNPICKLED = []


def _record():
    _UNPICKLED.append(1)
    return {}


class _Payload:
    def __reduce__(self):
        return (_record, ())


def test_pickles_are_refused(small, tmp_path):
    torch.save({"state_dict": small.state_dict(), "hook": _Payload()}, tmp_path / "pickle.pth")
    with pytest.raises(LatentLPIPSWeightsError, match="refused to load.*weights_only"):
        load_latent_lpips(tmp_path / "pickle.pth")
    assert not _UNPICKLED  # nothing from the file ran
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LatentLPIPSWeightsError, match="unreadable safetensors"):
        load_latent_lpips(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Data-free: pairs from the trajectory cache, labelled by a pixel metric of VAE decodes


def _fake_trajectories(store, n: int = 96, seed: int = 0):
    """A teacher-trajectories artifact whose pairs are one exact DDIM jump from known x0 (as the stage stores)."""
    from tlcm_core.schedule import NoiseSchedule
    from tlcm_core.toy.pipeline import scheduler_config

    sch = NoiseSchedule.from_config(scheduler_config())
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 4, 16, 16, generator=g)  # a few "prompts"
    x0 = base[torch.arange(n) % 4] + 0.3 * torch.randn(n, 4, 16, 16, generator=g)
    eps = torch.randn(n, 4, 16, 16, generator=g)
    t_hi = torch.randint(21, 1000, (n,), generator=g)
    t_lo = t_hi - 20
    a_hi, s_hi = sch.coeffs(t_hi, x0)
    a_lo, s_lo = sch.coeffs(t_lo, x0)
    art = store.artifact("teacher-trajectories", "0123456789abcdef")
    for name, v in (("x_hi", a_hi * x0 + s_hi * eps), ("x_lo", a_lo * x0 + s_lo * eps)):
        art.create_array(name, shape=v.shape, chunks=(32, 4, 16, 16), dtype="float32")[...] = v.numpy()
    for name, v in (("t_hi", t_hi), ("t_lo", t_lo)):
        art.create_array(name, shape=(n,), chunks=(32,), dtype="int32")[...] = v.numpy().astype(np.int32)
    return art, sch, x0


def test_x0_recovered_from_cached_pair(local_store):
    from tlcm_core.lpips_training import read_anchors

    art, sch, x0 = _fake_trajectories(local_store)
    anchors, info = read_anchors(art, sch)
    assert info["anchors"] == len(x0) and info["dropped_imprecise"] == 0
    torch.testing.assert_close(anchors, x0, rtol=0, atol=2e-3)


def test_datafree_training_runs_and_reports_correlation(local_store, tiny_teacher, pixel_lpips):
    from tlcm_core.config import TeacherConfig
    from tlcm_core.lpips_training import PAIR_KINDS, train_latent_lpips_datafree
    from tlcm_core.models import load_vae, vae_decoder

    art, sch, _ = _fake_trajectories(local_store)
    vae = load_vae(TeacherConfig(source=tiny_teacher), torch.device("cpu"))
    pixel = lambda a, b: pixel_lpips(a, b, normalize=True).flatten()  # noqa: E731 - random backbone: tests only
    fit = train_latent_lpips_datafree(art, vae_decoder(vae), pixel, 20, schedule=sch, width=SMALL, num_pairs=64,
                                      lr=1e-3, batch_size=16, seed=0, log_every=10)
    m = fit.metrics
    assert m["pairs"]["train"] + m["pairs"]["heldout"] == 64
    for key in ("heldout", "baseline_latent_mse", "untrained_latent_lpips"):
        assert -1 <= m[key]["pearson"] <= 1 and -1 <= m[key]["spearman"] <= 1
    assert set(m["heldout_per_kind"]) <= set(PAIR_KINDS)
    assert [r["step"] for r in fit.log] == [10, 20] and np.isfinite(fit.log[-1]["loss"])
    assert all(bool((lin.model[1].weight >= 0).all()) for lin in fit.model.lins)


# ---------------------------------------------------------------------------------------------------------------------
# BAPPS 2AFC


def _write_bapps(root, split: str, n: int, seed: int, size: int = 32) -> None:
    """Synthetic triplets in the BAPPS layout: smooth random references, a mild and a strong distortion (noise or
    blur); the judges mostly prefer the mild one, which lands in p0 or p1 at random (judge = share preferring p1)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        ref = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=size, mode="bicubic",
                                              align_corners=False)[0].clamp(0, 1)

        def distort(strength: float) -> torch.Tensor:
            if bool(torch.rand((), generator=g) < 0.5):
                return (ref + strength * torch.randn(ref.shape, generator=g)).clamp(0, 1)
            k = max(1, int(round(strength * 16)))
            return torch.nn.functional.avg_pool2d(ref[None], 2 * k + 1, 1, k, count_include_pad=False)[0]

        mild, strong = distort(0.03 + 0.05 * float(torch.rand((), generator=g))), distort(0.25)
        swap = bool(torch.rand((), generator=g) < 0.5)
        p0, p1 = (strong, mild) if swap else (mild, strong)
        judge = 0.9 if swap else 0.1
        for part, img in (("ref", ref), ("p0", p0), ("p1", p1)):
            d = root / split / "synth" / part
            d.mkdir(parents=True, exist_ok=True)
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:06d}.png")
        (root / split / "synth" / "judge").mkdir(parents=True, exist_ok=True)
        np.save(root / split / "synth" / "judge" / f"{i:06d}.npy", np.array([judge], dtype=np.float32))


def test_bapps_reader(tmp_path):
    from tlcm_core.lpips_training import read_bapps

    _write_bapps(tmp_path, "train", 6, seed=0)
    data = read_bapps(str(tmp_path), "train")
    assert data.ref.shape == (6, 3, 32, 32) and data.p1.shape == (6, 3, 32, 32)
    assert all(min(abs(j - 0.1), abs(j - 0.9)) < 1e-6 for j in data.judge.tolist()) and data.subset == ["synth"] * 6
    assert 0 <= float(data.ref.min()) and float(data.ref.max()) <= 1
    assert len(read_bapps(str(tmp_path), "train", max_triplets=4)) == 4
    assert read_bapps(str(tmp_path), "train", image_size=64).ref.shape[-1] == 64
    (tmp_path / "train" / "synth" / "judge" / "000003.npy").unlink()
    with pytest.raises(FileNotFoundError, match="without judge/.*000003"):
        read_bapps(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        read_bapps(str(tmp_path), "val")


def test_bapps_stage_trains_2afc_and_resolves(tmp_path, tiny_teacher, local_store):
    """The latent-lpips stage on synthetic BAPPS: 2AFC agreement on val beats chance, the artifact's weights come
    back through resolve_latent_lpips as the trainer's distance; source=file re-checks a file and reports 2AFC."""
    from tlcm_core.config import load_config
    from tlcm_core.lpips_training import resolve_latent_lpips
    from tlcm_core.pipeline import execute
    from tlcm_core.stages import REGISTRY
    from tlcm_core.progress import SilentReporter

    root = tmp_path / "bapps"
    _write_bapps(root, "train", 48, seed=1)
    _write_bapps(root, "val", 24, seed=2)
    cfg = load_config("toy-fast", [f"teacher.source={tiny_teacher}", f"store.url={local_store.url}",
                                   "latent_lpips.source=bapps", f"latent_lpips.bapps_url={root}",
                                   f"latent_lpips.width={SMALL}", "latent_lpips.steps=40", "latent_lpips.lr=1e-3",
                                   "latent_lpips.batch_size=8", "compute.device=cpu"])
    art = local_store.artifact("latent-lpips", "00000000000000aa")
    summary = execute(REGISTRY["latent-lpips"], cfg, {}, art, SilentReporter())
    metrics = art.read_json("metrics.json")
    assert metrics["val_from"] == "val" and metrics["triplets"] == {"train": 48, "val": 24}
    assert summary["val"]["2afc"] == metrics["val"]["2afc"] > 0.6, metrics
    assert 0.85 < metrics["majority_ceiling"] <= 0.9 + 1e-6
    log = art.read_bytes("train_log.jsonl").decode().splitlines()
    assert len(log) == 20 and json.loads(log[-1])["step"] == 40

    d = resolve_latent_lpips(cfg, local_store, art.uri)
    assert isinstance(d, LatentLPIPS) and d.width == SMALL and not d.training
    assert make_distance("latent-lpips", latent_lpips=d) is d
    assert resolve_latent_lpips(cfg, local_store, None) is None

    weights = tmp_path / "copy.safetensors"
    weights.write_bytes(art.read_bytes("latent_lpips.safetensors"))
    cfg_file = load_config("toy-fast", [f"teacher.source={tiny_teacher}", "latent_lpips.source=file",
                                        f"latent_lpips.weights={weights}", f"latent_lpips.bapps_url={root}",
                                        "compute.device=cpu"])
    art2 = local_store.artifact("latent-lpips", "00000000000000bb")
    execute(REGISTRY["latent-lpips"], cfg_file, {}, art2, SilentReporter())
    assert art2.read_json("metrics.json")["val"]["2afc"] == metrics["val"]["2afc"]
    assert isinstance(resolve_latent_lpips(cfg_file, local_store, None), LatentLPIPS)


def test_config_section_checks_its_source():
    from tlcm_core.config import ConfigError, load_config

    assert load_config("toy-fast").latent_lpips.source == "datafree"
    with pytest.raises(ConfigError, match="latent_lpips.weights"):
        load_config("toy-fast", ["latent_lpips.source=file"])
    with pytest.raises(ConfigError, match="bapps_url"):
        load_config("toy-fast", ["latent_lpips.source=bapps"])


@pytest.mark.parametrize("world", ["toy", "toy-hard"])
def test_toy_feature_distance_on_each_worlds_evaluator(world):
    """The data-free labels' pixel metric reads the shipped evaluator's layers, whatever its pooling (toy-hard's
    evaluator keeps its 4x4 map): 0 for identical images, larger for a different world image than a jittered one."""
    from tlcm_core.lpips_training import toy_feature_distance
    from tlcm_core.toy import ToyEvaluator, get_world

    d = toy_feature_distance(ToyEvaluator.load(world))
    x, _ = get_world(world).sample(8, seed=1)
    y, _ = get_world(world).sample(8, seed=2)
    same, near, far = d(x, x), d(x, (x + 0.02).clamp(0, 1)), d(x, y)
    assert same.shape == (8,) and torch.allclose(same, torch.zeros(8), atol=1e-6)
    assert (near < far).all()


def test_a_trainer_on_latent_lpips_brings_its_stage_along(tmp_path):
    """`mlcd.distance=latent-lpips` (datafree weights) without `latent-lpips` in `stages`: the run plans the stage
    before MLCD instead of failing at MLCD after the teacher's pairs are made; with MSE it is not planned."""
    from tlcm_core.config import load_config
    from tlcm_core.pipeline import plan_run

    base = [f"store.url={tmp_path}", "stages=[teacher-trajectories,mlcd]"]
    todo = plan_run(load_config("toy-fast", [*base, "mlcd.distance=latent-lpips"]), access="none").todo
    assert todo == ["teacher-trajectories", "latent-lpips", "mlcd"]
    assert plan_run(load_config("toy-fast", base), access="none").todo == ["teacher-trajectories", "mlcd"]
