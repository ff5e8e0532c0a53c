"""Artifact store: fingerprints, files, zarr arrays, safetensors, manifests, corruption, access failures.

Parametrized tests run on a local folder and on a real S3 endpoint (moto server on loopback).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from conftest import S3_SECRET, MotoEndpoint, free_port
from safetensors import safe_open

from tlcm_core.store import (
    ArtifactStore,
    CorruptArtifactError,
    IncompleteArtifactError,
    Manifest,
    StoreError,
    fingerprint,
)

CONFIG = {"steps": 4, "guidance": 8.0, "teacher": {"name": "toy", "dims": [4, 8]}}
INPUTS = {"prompts": "0123456789abcdef"}


@pytest.fixture(params=["local", "s3"])
def store(request) -> ArtifactStore:
    return request.getfixturevalue(f"{request.param}_store")


def _overwrite(art, rel: str, data: bytes) -> None:
    """Change a file behind the store's back (what a crash, a bad disk or another tool would do)."""
    art.fs.pipe_file(art.path(rel), data)


def _committed(store: ArtifactStore, stage: str = "teacher-trajectories", config: dict = CONFIG,
               before_commit=None):
    fp = fingerprint(stage, 1, config, INPUTS)
    art = store.artifact(stage, fp)
    arr = art.create_array("latents", shape=(8, 4, 4), chunks=(2, 4, 4), dtype="float32")
    arr[:] = np.arange(8 * 4 * 4, dtype=np.float32).reshape(8, 4, 4) + 1
    art.save_tensors("lora.safetensors", {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)},
                     metadata={"rank": "4"})
    art.write_json("log.json", {"loss": [1.0, 0.5]})
    if before_commit is not None:
        before_commit(art)
    manifest = art.commit(version=1, config=config, inputs={"prompts": "s3://elsewhere/prompts/0123"},
                          summary={"n": 8})
    return art, manifest


# -- fingerprints ---------------------------------------------------------------------------------------


def test_fingerprint_is_stable_canonical_and_sensitive():
    fp = fingerprint("mlcd", 3, CONFIG, INPUTS)
    assert len(fp) == 16 and int(fp, 16) >= 0
    # Key order does not matter; the value is sha256 of the canonical JSON (a format we must keep).
    reordered = {"teacher": {"dims": [4, 8], "name": "toy"}, "guidance": 8.0, "steps": 4}
    assert fingerprint("mlcd", 3, reordered, dict(INPUTS)) == fp
    canonical = json.dumps({"stage": "mlcd", "version": 3, "config": CONFIG, "inputs": INPUTS},
                           sort_keys=True, separators=(",", ":"))
    assert fp == hashlib.sha256(canonical.encode()).hexdigest()[:16]

    variants = [
        fingerprint("mlcd", 4, CONFIG, INPUTS),  # version
        fingerprint("lcd", 3, CONFIG, INPUTS),  # stage
        fingerprint("mlcd", 3, {**CONFIG, "steps": 5}, INPUTS),  # top-level config value
        fingerprint("mlcd", 3, {**CONFIG, "teacher": {"name": "toy", "dims": [4, 9]}}, INPUTS),  # nested
        fingerprint("mlcd", 3, {**CONFIG, "extra": None}, INPUTS),  # added key
        fingerprint("mlcd", 3, CONFIG, {"prompts": "0123456789abcdee"}),  # input fingerprint
        fingerprint("mlcd", 3, CONFIG, {"prompts2": "0123456789abcdef"}),  # input name
        fingerprint("mlcd", 3, CONFIG, {}),  # input removed
    ]
    assert fp not in variants and len(set(variants)) == len(variants)


def test_fingerprint_rejects_values_that_are_not_plain_json():
    with pytest.raises(TypeError, match="JSON"):
        fingerprint("mlcd", 1, {"s": {1, 2}}, {})
    with pytest.raises(TypeError, match="JSON"):
        fingerprint("mlcd", 1, {"lr": float("nan")}, {})


# -- arrays and tensors -----------------------------------------------------------------------------------


def test_zarr_array_round_trip(store):
    art = store.artifact("teacher-trajectories", "a" * 16)
    arr = art.create_array("x_hi", shape=(12, 4, 8, 8), chunks=(4, 4, 8, 8), dtype="float32", fill_value=0)
    rng = np.random.default_rng(0)
    first, last = rng.standard_normal((2, 4, 4, 8, 8), dtype=np.float32)
    arr[0:4] = first
    arr[8:12] = last  # rows 4..7 left unwritten
    back = art.open_array("x_hi")
    assert back.shape == (12, 4, 8, 8) and back.dtype == np.float32
    np.testing.assert_array_equal(back[0:4], first)
    np.testing.assert_array_equal(back[8:12], last)
    np.testing.assert_array_equal(back[4:8], np.zeros((4, 4, 8, 8), np.float32))
    with pytest.raises(Exception):  # opened read-only
        back[0:4] = 1.0


def test_safetensors_round_trip_with_metadata(store):
    art = store.artifact("mlcd", "b" * 16)
    tensors = {
        "lora.down": torch.randn(4, 32),
        "lora.up": torch.randn(32, 4).to(torch.bfloat16),
        "half": torch.randn(3, 3).half(),
        "step": torch.tensor([123], dtype=torch.int64),
        "strided": torch.randn(6, 6).t(),  # non-contiguous input
    }
    meta = {"format": "pt", "rank": "4", "base": "toy"}
    art.save_tensors("ckpt/lora.safetensors", tensors, metadata=meta)
    loaded = art.load_tensors("ckpt/lora.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    assert art.tensors_metadata("ckpt/lora.safetensors") == meta
    with art.local_copy("ckpt/lora.safetensors") as local:
        assert os.path.isfile(local)
        with safe_open(local, "pt") as f:
            assert f.metadata() == meta and set(f.keys()) == set(tensors)
    if not store.is_local:
        assert not os.path.exists(local)  # the temp download is cleaned up


def test_create_array_resumes_and_rejects_mismatched_metadata(store):
    art = store.artifact("teacher-trajectories", "c" * 16)
    arr = art.create_array("x_lo", shape=(8, 3), chunks=(2, 3), dtype="float32")
    arr[0:2] = 7.0
    again = art.create_array("x_lo", shape=(8, 3), chunks=(2, 3), dtype=np.float32)  # resume
    np.testing.assert_array_equal(again[0:2], np.full((2, 3), 7.0, np.float32))
    again[2:4] = 8.0
    np.testing.assert_array_equal(art.open_array("x_lo")[0:4, 0], [7, 7, 8, 8])

    for kwargs in ({"shape": (10, 3), "chunks": (2, 3), "dtype": "float32"},
                   {"shape": (8, 3), "chunks": (4, 3), "dtype": "float32"},
                   {"shape": (8, 3), "chunks": (2, 3), "dtype": "float16"},
                   {"shape": (8, 3), "chunks": (2, 3), "dtype": "float32", "fill_value": 1.0}):
        with pytest.raises(CorruptArtifactError) as err:
            art.create_array("x_lo", **kwargs)
        assert art.uri in str(err.value) and "x_lo" in str(err.value)
    np.testing.assert_array_equal(art.open_array("x_lo")[0:2, 0], [7, 7])  # rejected create kept the data

    fresh = art.create_array("x_lo", shape=(10, 3), chunks=(5, 3), dtype="float16", overwrite=True)
    assert fresh.shape == (10, 3) and fresh.dtype == np.float16
    np.testing.assert_array_equal(art.open_array("x_lo")[:], np.zeros((10, 3), np.float16))


_WRITER = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from tlcm_core.store import ArtifactStore
    a = json.load(open(sys.argv[1]))
    art = ArtifactStore(a["url"], a["storage_options"]).open_uri(a["uri"])
    arr = art.open_array("x", mode="r+")
    open(a["ready"], "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(a["go"]) and time.monotonic() < deadline:
        time.sleep(0.005)
    rows, cols = arr.chunks
    for c in a["chunks"]:
        arr[c * rows:(c + 1) * rows] = np.float32(c + 1) + np.tile(np.arange(cols, dtype=np.float32), (rows, 1))
    art.mark_done(f"shard-{a['worker']}", {"chunks": a["chunks"]})
""")


def test_two_processes_fill_disjoint_chunks_of_one_array(store, tmp_path):
    art = store.artifact("teacher-trajectories", "d" * 16)
    n_chunks, rows, cols = 24, 2, 256
    art.create_array("x", shape=(n_chunks * rows, cols), chunks=(rows, cols), dtype="float32")
    art.mark_done("prepared")
    # Listed before the workers write: a cached listing would hide their markers afterwards.
    assert art.done_markers() == {"prepared"} and not art.is_done("shard-0")
    procs = []
    for worker in range(2):
        args = {"url": store.url, "storage_options": store.storage_options, "uri": art.uri, "worker": worker,
                "chunks": list(range(worker, n_chunks, 2)),  # interleaved, so writes land side by side
                "ready": str(tmp_path / f"ready{worker}"), "go": str(tmp_path / "go")}
        (tmp_path / f"args{worker}.json").write_text(json.dumps(args))
        procs.append(subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / f"args{worker}.json")],
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{w}").exists() for w in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "writers failed to start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]

    data = art.open_array("x")[:]
    expected = np.repeat(np.arange(1, n_chunks + 1, dtype=np.float32), rows)[:, None] + np.arange(cols)
    np.testing.assert_array_equal(data, expected)
    assert art.done_markers() == {"prepared", "shard-0", "shard-1"}
    assert art.is_done("shard-0") and art.is_done("shard-1") and not art.is_done("shard-2")


# -- files, markers, commit -------------------------------------------------------------------------------


def test_files_dirs_and_markers(store, tmp_path):
    art = store.artifact("export", "e" * 16)
    art.write_bytes("raw/blob.bin", b"\x00\x01\x02")
    assert art.read_bytes("raw/blob.bin") == b"\x00\x01\x02" and art.exists_file("raw/blob.bin")
    assert not art.exists_file("raw/other.bin")
    art.write_json("card.json", {"a": [1, 2]})
    assert art.read_json("card.json") == {"a": [1, 2]}

    src = tmp_path / "diffusers"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text('{"x": 1}')
    (src / "unet" / "weights.bin").write_bytes(os.urandom(3000))
    art.upload_dir(src, "model")
    assert art.exists_file("model/unet/weights.bin")
    art.download_dir("model", tmp_path / "back")
    assert (tmp_path / "back" / "model_index.json").read_text() == '{"x": 1}'
    weights = (src / "unet" / "weights.bin").read_bytes()
    assert (tmp_path / "back" / "unet" / "weights.bin").read_bytes() == weights

    assert art.done_markers() == set() and not art.is_done("shard-0")
    art.mark_done("shard-0", {"rows": 4})
    art.mark_done("shard-1")
    assert art.done_markers() == {"shard-0", "shard-1"} and art.is_done("shard-0")
    with pytest.raises(StoreError):
        art.write_bytes("manifest.json", b"{}")  # only commit() writes the manifest


def _bookkeeping(art) -> None:
    art.mark_done("shard-0")
    art.write_bytes("checkpoints/step-10/lora.safetensors", b"ckpt")
    art.write_bytes("_lease.json", b"{}")
    art.write_bytes("latents/.c.abc.tmp", b"in flight")
    art.write_bytes("latents/c/0/zarr.1234.partial", b"zarr in flight")


def test_commit_writes_a_manifest_that_verifies(store):
    art, m = _committed(store, before_commit=_bookkeeping)
    assert art.is_done("shard-0") and art.exists_file("checkpoints/step-10/lora.safetensors")
    assert art.exists() and art.is_complete() and art.is_complete("checksum")
    got = art.manifest("checksum")
    assert got == m
    assert (got.stage, got.fingerprint, got.version) == (art.stage, art.fingerprint, 1)
    assert got.config == CONFIG and got.summary == {"n": 8} and got.inputs["prompts"].startswith("s3://")
    assert got.created.utcoffset().total_seconds() == 0 and got.code_version.startswith("0.1.0")
    assert set(got.files) == {"latents/zarr.json", "lora.safetensors", "log.json"} | {
        f"latents/c/{i}/0/0" for i in range(4)}
    assert got.files["log.json"].sha256 == hashlib.sha256(art.read_bytes("log.json")).hexdigest()
    assert got.files["lora.safetensors"].size == len(art.read_bytes("lora.safetensors"))
    # The manifest is plain JSON a person can read.
    assert json.loads(art.read_bytes("manifest.json"))["format"] == "tlcm-artifact/1"

    with pytest.raises(StoreError, match="already committed"):
        art.commit(version=1, config=CONFIG, inputs={})
    with pytest.raises(StoreError, match="refusing"):
        art.clear_partial()
    assert art.is_complete("checksum")


def test_list_open_uri_and_clear_partial(store):
    first, _ = _committed(store, "mlcd", {"k": 1})
    second, _ = _committed(store, "lcd", {"k": 2})
    partial = store.artifact("mlcd", "f" * 16)
    partial.write_bytes("x.bin", b"partial")
    foreign = store.artifact("mlcd", "0" * 16)
    foreign.write_bytes("x.bin", b"x")
    _overwrite(foreign, "manifest.json", first.read_bytes("manifest.json"))

    assert [(m.stage, m.fingerprint) for m in store.list()] == [
        (first.stage, first.fingerprint), (second.stage, second.fingerprint)]
    assert store.open_uri(first.uri) == first and store.open_uri(first.uri + "/") == first
    assert store.open_uri(second.uri).manifest().config == {"k": 2}

    assert not partial.exists() and not partial.is_complete()
    partial.clear_partial()
    assert not partial.exists_file("x.bin")
    assert first.is_complete("checksum")  # clearing one artifact leaves the others alone


# -- incomplete and corrupt artifacts ------------------------------------------------------------------


def test_missing_manifest_is_incomplete(store):
    art = store.artifact("teacher-trajectories", "1" * 16)
    art.create_array("latents", shape=(4, 2), chunks=(2, 2), dtype="float32")[:] = 1.0
    art.mark_done("shard-0")
    assert not art.exists()
    assert not art.is_complete() and not art.is_complete("none")
    with pytest.raises(IncompleteArtifactError) as err:
        art.manifest()
    assert art.uri in str(err.value)
    assert store.list() == []


def _chunk(manifest: Manifest) -> str:
    return next(rel for rel in manifest.files if rel.startswith("latents/c/"))


def _flip_byte(art, rel: str) -> None:
    data = bytearray(art.read_bytes(rel))
    data[len(data) // 2] ^= 0x01
    _overwrite(art, rel, bytes(data))


CORRUPTIONS = {
    # name: (corrupt(art, manifest) -> file named in the error, lowest verify level that must catch it)
    "truncated-manifest": (lambda a, m: _overwrite(a, "manifest.json", a.read_bytes("manifest.json")[:50])
                           or "manifest.json", "none"),
    "foreign-manifest": (lambda a, m: _overwrite(a, "manifest.json", m.model_copy(
        update={"fingerprint": "9" * 16}).model_dump_json().encode()) or "manifest.json", "none"),
    "unknown-format": (lambda a, m: _overwrite(a, "manifest.json", json.dumps(
        {**json.loads(a.read_bytes("manifest.json")), "format": "tlcm-artifact/2"}).encode())
                       or "manifest.json", "none"),
    "missing-file": (lambda a, m: a.fs.rm_file(a.path("log.json")) or "log.json", "size"),
    "truncated-file": (lambda a, m: _overwrite(a, "lora.safetensors", a.read_bytes("lora.safetensors")[:-7])
                       or "lora.safetensors", "size"),
    "flipped-zarr-chunk-byte": (lambda a, m: _flip_byte(a, _chunk(m)) or _chunk(m), "checksum"),
    "flipped-safetensors-byte": (lambda a, m: _flip_byte(a, "lora.safetensors") or "lora.safetensors",
                                 "checksum"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_is_detected_and_never_complete(store, kind):
    art, manifest = _committed(store)
    corrupt, level = CORRUPTIONS[kind]
    bad_file = corrupt(art, manifest)
    levels = ["none", "size", "checksum"]
    for verify in levels[:levels.index(level)]:  # levels too cheap to see this damage
        assert art.is_complete(verify)
    for verify in levels[levels.index(level):]:
        assert not art.is_complete(verify)
        with pytest.raises(CorruptArtifactError) as err:
            art.manifest(verify)
        assert art.uri in str(err.value) and bad_file in str(err.value)
    if level == "none":
        assert store.list() == []  # unreadable or foreign manifests are not listed as complete


# -- access failures, path safety, secrets ----------------------------------------------------------------


def test_check_access_passes_on_a_usable_store(store):
    store.check_access(write=True)
    store.check_access(write=False)
    assert store.list() == []  # the write probe leaves nothing behind


def test_unreachable_endpoint_fails_fast_naming_the_url(s3_endpoint):
    dead = f"http://127.0.0.1:{free_port()}"
    store = ArtifactStore("s3://some-bucket/root", {**s3_endpoint.storage_options, "endpoint_url": dead})
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.check_access()
    assert time.monotonic() - t0 < 15
    assert "s3://some-bucket/root" in str(err.value) and dead in str(err.value)


def test_missing_bucket_fails_fast_naming_the_url(s3_endpoint):
    store = ArtifactStore("s3://no-such-bucket-here/root", s3_endpoint.storage_options)
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.check_access(write=False)
    assert time.monotonic() - t0 < 15
    assert "s3://no-such-bucket-here/root" in str(err.value) and "does not exist" in str(err.value)


def test_store_from_env_and_endpoint_stop_pause_restart(monkeypatch):
    endpoint = MotoEndpoint()
    endpoint.start()
    try:
        for k, v in endpoint.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        bucket = endpoint.make_bucket()
        store = ArtifactStore(f"s3://{bucket}")  # endpoint and credentials from the environment
        store.check_access()
        store.artifact("mlcd", "2" * 16).write_bytes("a.bin", b"a")

        endpoint.pause()  # accepts connections, never answers
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=endpoint.url):
            store.check_access()
        assert time.monotonic() - t0 < 15
        endpoint.resume()
        store.check_access()

        endpoint.stop()  # connection refused
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=f"s3://{bucket}"):
            store.check_access()
        assert time.monotonic() - t0 < 15
        endpoint.start()  # moto keeps state in memory: the bucket is gone after a restart
        with pytest.raises(StoreError, match="does not exist"):
            store.check_access()
        endpoint.make_bucket(bucket)
        store.check_access()
    finally:
        endpoint.stop()
    assert not endpoint.running


def test_paths_cannot_escape(store):
    art = store.artifact("mlcd", "3" * 16)
    assert art.path("a/./b.bin") == art.uri + "/a/b.bin"
    for bad in ["../x", "a/../../x", "/etc/passwd", "..", "", "a\\..\\x", "s3://other/x"]:
        with pytest.raises(StoreError):
            art.path(bad)
        with pytest.raises(StoreError):
            art.write_bytes(bad, b"x")
    for stage, fp in [("..", "0" * 16), ("mlcd", "../x"), ("a/b", "0" * 16)]:
        with pytest.raises(StoreError):
            store.artifact(stage, fp)
    with pytest.raises(StoreError):
        art.mark_done("../escape")
    root = store.url
    for bad_uri in [f"{root}/mlcd/../../outside/0123", f"{root}/../x/mlcd/0123", f"{root}-sibling/mlcd/0123",
                    "s3://elsewhere/mlcd/0123", "/tmp/mlcd/0123", f"{root}/mlcd"]:
        with pytest.raises(StoreError):
            store.open_uri(bad_uri)


def test_secret_never_appears_in_repr_errors_or_manifests(s3_endpoint, s3_store):
    assert S3_SECRET in str(s3_store.storage_options)  # the secret is really in use here...
    art, _ = _committed(s3_store)
    texts = [str(s3_store), repr(s3_store), str(art), repr(art), art.read_bytes("manifest.json").decode(),
             repr(s3_store.list()), repr(art.manifest())]
    dead = {**s3_endpoint.storage_options, "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    for make in [
        lambda: ArtifactStore("s3://gone-bucket", s3_endpoint.storage_options).check_access(),
        lambda: ArtifactStore("s3://x-bucket", dead).check_access(),
        lambda: s3_store.artifact("mlcd", "4" * 16).manifest(),
        lambda: s3_store.open_uri("s3://elsewhere/mlcd/0123"),
    ]:
        with pytest.raises(StoreError) as err:
            make()
        texts += [str(err.value), repr(err.value)]
    for text in texts:  # ...but never shows
        assert S3_SECRET not in text
