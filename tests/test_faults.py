"""Fault injection (tests/README.md has the fault table): SIGKILL during a trajectory shard, during training and
during an artifact commit; an S3 endpoint that goes away for a while or for good; corrupted chunks, LoRAs,
manifests and checkpoints. Every fault is injected for real -- a killed process, a cut TCP connection, bytes
changed on disk -- and every rerun is compared with an uninterrupted run of the same config.

Killed workers are forked from the test process (already warm: no 7 s of imports per worker), run
`run_pipeline` in their own process group, and are SIGKILLed by the test; nothing is left running.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import S3_SECRET, free_port

from tlcm_core.config import load_config
from tlcm_core.pipeline import open_store, plan, run_pipeline
from tlcm_core.progress import Reporter, SilentReporter
from tlcm_core.store import Artifact, ArtifactStore, CorruptArtifactError, RetryPolicy, StoreUnavailableError
from tlcm_core.pairs import sample_seed

TRAJ, MLCD = "teacher-trajectories", "mlcd"
N, SHARD = 48, 16  # 3 shards


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers (also imported by the other fault-test modules)


_CACHE: dict[str, object] = {}


def tiny_teacher_dir() -> str:
    """A tiny random-weight SDXL-shaped teacher saved as a diffusers folder, built once per session."""
    if "teacher" not in _CACHE:
        from tlcm_core.toy.pipeline import build_toy_pipeline

        root = tempfile.mkdtemp(prefix="tlcm-faults-teacher-")
        atexit.register(shutil.rmtree, root, True)
        build_toy_pipeline(seed=3).save_pretrained(os.path.join(root, "tiny-sdxl"))
        _CACHE["teacher"] = os.path.join(root, "tiny-sdxl")
    return _CACHE["teacher"]  # type: ignore[return-value]


def fault_config(store: str, *extra: str):
    """Tiny trajectories (48 samples, 3 shards) and MLCD (8 steps, checkpoints at 3 and 6, warmup over all 8 steps
    so that a resumed learning-rate schedule must be exact)."""
    return load_config("toy-fast", [
        f"teacher.source={tiny_teacher_dir()}", f"store.url={store}", "stages=[teacher-trajectories,mlcd]",
        f"trajectories.num_samples={N}", f"trajectories.shard_size={SHARD}", "trajectories.batch_size=16",
        "mlcd.iterations=8", "mlcd.batch_size=8", "mlcd.checkpoint_every=3", "mlcd.log_every=2", "mlcd.warmup=8",
        "mlcd.prefetch=1", "lora.rank=4", *extra])


def reference() -> tuple[object, ArtifactStore]:
    """An uninterrupted run of trajectories + MLCD (once per session): what every faulted run must reproduce."""
    if "reference" not in _CACHE:
        root = tempfile.mkdtemp(prefix="tlcm-faults-reference-")
        atexit.register(shutil.rmtree, root, True)
        cfg = fault_config(os.path.join(root, "store"))
        results = run_pipeline(cfg, reporter=SilentReporter())
        assert [r.cached for r in results] == [False, False]
        _CACHE["reference"] = (cfg, open_store(cfg))
    return _CACHE["reference"]  # type: ignore[return-value]


def ref_artifact(stage: str) -> Artifact:
    cfg, store = reference()
    return store.artifact(stage, plan(cfg)[stage].fingerprint)


def copy_artifact(stage: str, dest_root: str | Path) -> None:
    """Copy a reference artifact folder into another local store (fingerprints do not depend on the store)."""
    src = ref_artifact(stage)
    shutil.copytree(src.uri, os.path.join(dest_root, stage, src.fingerprint))


def assert_same_trajectories(art: Artifact) -> None:
    """Same files with the same sha256 as the uninterrupted run, every array equal byte for byte, and exactly the
    N planned samples (no sample missing, none twice)."""
    ref = ref_artifact(TRAJ)
    got, want = art.manifest("checksum"), ref.manifest("checksum")
    assert got.files == want.files
    assert got.summary["num_samples"] == want.summary["num_samples"] == N
    arrays = sorted(rel[: -len("/zarr.json")] for rel in want.files if rel.endswith("/zarr.json"))
    assert {"x_hi", "x_lo", "t_hi", "t_lo", "seed", "prompt_idx"} <= set(arrays)
    for name in arrays:
        a, b = art.open_array(name)[...], ref.open_array(name)[...]
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    seeds = art.open_array("seed")[...]
    assert seeds.tolist() == [sample_seed(0, i) for i in range(N)] and len(set(seeds.tolist())) == N


def assert_same_lora(art: Artifact) -> None:
    got, want = art.load_tensors("lora.safetensors"), ref_artifact(MLCD).load_tensors("lora.safetensors")
    assert set(got) == set(want) and got
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert art.manifest("checksum").files["lora.safetensors"] == ref_artifact(MLCD).manifest().files[
        "lora.safetensors"]


def wait_for(cond, timeout: float, what: str, proc=None, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and not proc.is_alive():
            raise AssertionError(f"worker exited (code {proc.exitcode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def _child_entry(target, args) -> None:
    os.setsid()  # own process group, so the test can kill the worker and anything it started
    logging.disable(logging.CRITICAL)
    target(*args)


@contextlib.contextmanager
def forked_worker(target, *args):
    """Run target(*args) in a forked worker process (own process group); always killed and reaped on exit."""
    p = multiprocessing.get_context("fork").Process(target=_child_entry, args=(target, args))
    p.start()
    try:
        yield p
    finally:
        kill_worker(p)


def kill_worker(p) -> None:
    if p.pid is None:
        return
    for kill in (lambda: os.killpg(p.pid, signal.SIGKILL), p.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            kill()
    p.join(timeout=30)
    assert not p.is_alive()


def touch(path: str | Path) -> None:
    Path(path).write_text(str(os.getpid()))


def hang(signal_file: str | Path) -> None:
    """In a worker: say where we are, then wait to be killed."""
    touch(signal_file)
    time.sleep(600)


class TcpProxy:
    """A TCP forwarder in front of the S3 endpoint that can be cut: stop() closes the listening port (new
    connections are refused) and drops every open connection mid-request, start() listens again on the same port.
    Unlike restarting moto, the data behind it survives.

    Outages that must be *met* by the code under test end on what was observed, never on a clock: go_down() drops
    every open connection and refuses new ones until come_back(); freeze(n, pause, resume) pauses the server and
    resumes it once n request chunks have reached it."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._lsock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.refused = 0  # connections refused since the last go_down()
        self.down = False
        self.back_up = threading.Event()  # set by come_back()
        self.frozen_requests = 0  # request chunks that reached the server during the current/last freeze()
        self._freeze_left = 0
        self._resume = None
        self.thawed = threading.Event()  # set when freeze()'s freeze is over

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.05)
        self._lsock = s
        t = threading.Thread(target=self._accept, args=(s,), daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self, lsock: socket.socket) -> None:
        while self._lsock is lsock:
            try:
                c, _ = lsock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                refuse = self.down
                self.refused += refuse
            if refuse:  # down: reset the connection before reading a byte of the request
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.close()
                continue
            c.settimeout(None)
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns.update((c, u))
            for a, b, upstream in ((c, u, True), (u, c, False)):
                threading.Thread(target=self._pipe, args=(a, b, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, upstream: bool) -> None:
        try:
            while data := a.recv(65536):
                frozen = upstream and self._freeze_left > 0  # freeze() paused the server before arming this
                b.sendall(data)
                if frozen:
                    self._reached_frozen_server()
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        lsock, self._lsock = self._lsock, None
        if lsock is not None:
            lsock.close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self._drop_connections()

    def _drop_connections(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def go_down(self) -> None:
        """The endpoint goes away until come_back(): every open connection is dropped mid-request and every new one
        is refused (reset on accept, counted in `refused`), while the port stays ours."""
        assert self._lsock is not None
        with self._lock:
            self.refused, self.down = 0, True
            self.back_up.clear()
        self._drop_connections()

    def come_back(self) -> None:
        with self._lock:
            self.down = False
            self.back_up.set()

    def freeze(self, until_requests: int, pause, resume) -> None:
        """pause() the server (connections hang, nothing is lost) and resume() it once `until_requests` request
        chunks have been forwarded to it while paused: the code under test is then waiting on the frozen server."""
        assert until_requests > 0
        with self._lock:
            self.frozen_requests, self._resume = 0, resume
            self.thawed.clear()
            pause()
            self._freeze_left = until_requests  # armed only once the server is paused

    def _reached_frozen_server(self) -> None:
        with self._lock:
            if self._freeze_left <= 0:
                return
            self.frozen_requests += 1
            self._freeze_left -= 1
            if self._freeze_left == 0:
                self._resume()
                self.thawed.set()


# ----------------------------------------------------------------------------------------------------------------
# 1. Killed mid-work


def _worker_killed_in_shard(cfg, signal_file) -> None:
    import zarr

    orig = zarr.Array.__setitem__

    def setitem(self, key, value):
        # shard 1: x_hi is already written, x_lo not, no marker yet -> a torn shard
        if str(self.store_path).endswith("/x_lo") and isinstance(key, slice) and (key.start or 0) >= SHARD:
            hang(signal_file)
        return orig(self, key, value)

    zarr.Array.__setitem__ = setitem
    run_pipeline(cfg, stages=[TRAJ], reporter=SilentReporter())


def test_sigkill_during_a_trajectory_shard_then_rerun_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    reference()
    cfg = fault_config(str(tmp_path / "store"))
    art = open_store(cfg).artifact(TRAJ, plan(cfg)[TRAJ].fingerprint)
    with forked_worker(_worker_killed_in_shard, cfg, tmp_path / "in-shard-1") as p:
        wait_for(lambda: (tmp_path / "in-shard-1").exists(), 120, "the worker to be inside shard 1", p)
        shards = {m for m in art.done_markers() if m.startswith("shard-")}
        assert shards == {"shard-00000"}  # >= 1 shard done, not all
        os.killpg(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
    assert not art.exists() and art.exists_file("_lease.json")  # killed: no manifest, a dead worker's lease

    import tlcm_core.stages.teacher_trajectories as traj

    computed, real = [], traj.compute_shard
    monkeypatch.setattr(traj, "compute_shard", lambda *a, **k: computed.append(a[4]) or real(*a, **k))
    t0 = time.monotonic()
    (res,) = run_pipeline(cfg, stages=[TRAJ], reporter=SilentReporter())
    assert not res.cached and time.monotonic() - t0 < 60  # the dead worker's lease did not hold us up
    assert computed == [16, 32]  # resumed: only the torn shard and the missing one, not shard 0 again
    assert_same_trajectories(art)
    assert not art.exists_file("_lease.json")


class _HangAtStep(Reporter):
    def __init__(self, stage: str, step: int, signal_file):
        super().__init__(bars=False)
        self.stage, self.step, self.signal_file = stage, step, signal_file

    def progress(self, key, done, total, **metrics):
        if key == self.stage and done == self.step:
            hang(self.signal_file)


def _worker_killed_in_training(cfg, signal_file) -> None:
    run_pipeline(cfg, reporter=_HangAtStep(MLCD, 4, signal_file))  # step 4: after the checkpoint at step 3


def test_sigkill_during_training_resumes_from_the_last_checkpoint_to_the_same_lora(tmp_path):
    reference()
    store_dir = tmp_path / "store"
    copy_artifact(TRAJ, store_dir)  # the cached trajectories; MLCD is what gets killed
    cfg = fault_config(str(store_dir))
    art = open_store(cfg).artifact(MLCD, plan(cfg)[MLCD].fingerprint)
    with forked_worker(_worker_killed_in_training, cfg, tmp_path / "at-step-4") as p:
        wait_for(lambda: art.exists_file("checkpoints/latest.json"), 120, "the first checkpoint", p)
        wait_for(lambda: (tmp_path / "at-step-4").exists(), 60, "training step 4", p)
        os.killpg(p.pid, signal.SIGKILL)
        p.join(10)
    latest = art.read_json("checkpoints/latest.json")
    assert latest["step"] == 3 and not art.exists()

    (traj_res, mlcd_res) = run_pipeline(cfg, reporter=SilentReporter())
    assert traj_res.cached and not mlcd_res.cached
    assert mlcd_res.summary["resumed_from_step"] == latest["step"]  # not from zero, not past it
    assert_same_lora(art)
    steps = [json.loads(ln)["step"] for ln in art.read_bytes("train_log.jsonl").decode().splitlines()]
    assert steps == [2, 4, 6, 8]  # no step logged twice or missing


def _worker_killed_in_commit(cfg, signal_file) -> None:
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith("/manifest.json"):  # the manifest is fully written to its temp file, not yet in place
            hang(signal_file)
        return real(src, dst, *a, **k)

    os.replace = replace
    run_pipeline(cfg, stages=[TRAJ], reporter=SilentReporter())


def test_sigkill_during_commit_then_rerun_commits_a_complete_verifying_artifact(tmp_path, monkeypatch):
    reference()
    cfg = fault_config(str(tmp_path / "store"))
    art = open_store(cfg).artifact(TRAJ, plan(cfg)[TRAJ].fingerprint)
    with forked_worker(_worker_killed_in_commit, cfg, tmp_path / "in-commit") as p:
        wait_for(lambda: (tmp_path / "in-commit").exists(), 120, "the worker to be inside commit", p)
        os.killpg(p.pid, signal.SIGKILL)
        p.join(10)
    leftovers = [f for f in os.listdir(art.uri) if f.startswith(".manifest.json.")]
    assert leftovers and not art.exists() and not art.is_complete()  # a torn commit is not a complete artifact
    assert {m for m in art.done_markers() if m.startswith("shard-")} == {f"shard-{i:05d}" for i in range(3)}

    import tlcm_core.models as models

    def no_teacher(*a, **k):
        raise AssertionError("every shard was done: the rerun must only commit")

    monkeypatch.setattr(models, "load_pipeline", no_teacher)
    (res,) = run_pipeline(cfg, stages=[TRAJ], reporter=SilentReporter())
    assert not res.cached
    m = art.manifest("checksum")
    assert not any(".tmp" in f or f.startswith(".") for f in m.files)
    assert_same_trajectories(art)


# ----------------------------------------------------------------------------------------------------------------
# 2. Storage faults


@pytest.fixture
def s3_proxy(s3_endpoint, monkeypatch):
    """The session's moto endpoint behind a TCP proxy that the test can cut; stores made now go through it."""
    if not s3_endpoint.running:
        s3_endpoint.start()
    proxy = TcpProxy(s3_endpoint.port)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    try:
        yield proxy
    finally:
        proxy.stop()
        s3_endpoint.resume()


def test_s3_endpoint_down_then_frozen_mid_stage_is_retried_with_backoff_and_the_stage_succeeds(
        s3_endpoint, s3_proxy, monkeypatch, caplog):
    reference()
    monkeypatch.setenv("TLCM_STORE_RETRY_TOTAL_S", "60")
    cfg = fault_config(f"s3://{s3_endpoint.make_bucket()}/artifacts")
    faults: list[str] = []
    real = Artifact.mark_done

    # Each fault lasts until the code under test has met it, never for a number of seconds: however slow or fast
    # the machine, the outage ends once the store has retried RETRIES times (with backoff) and the freeze once a
    # request has reached the frozen server. (Counting refused connections instead is not enough: aiohttp may retry
    # a reset connection itself, so a refusal is not always a retry of ours.)
    RETRIES = 3
    outage_retries: list[str] = []

    class EndTheOutageOnceMet(logging.Handler):
        def emit(self, record):
            if s3_proxy.down and "; retry " in record.getMessage():
                outage_retries.append(record.getMessage())
                if len(outage_retries) == RETRIES:
                    s3_proxy.come_back()

    def mark_done(self, name, info=None):
        real(self, name, info)
        if name == "shard-00000" and not faults:  # the endpoint goes away: open connections dropped, new refused
            faults.append(name)
            s3_proxy.go_down()
        elif name == "shard-00001" and faults == ["shard-00000"]:  # then the server freezes (connections hang)
            faults.append(name)
            s3_proxy.freeze(1, s3_endpoint.pause, s3_endpoint.resume)

    monkeypatch.setattr(Artifact, "mark_done", mark_done)
    store_log, handler = logging.getLogger("tlcm.store"), EndTheOutageOnceMet()
    store_log.addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="tlcm.store"):
            (res,) = run_pipeline(cfg, stages=[TRAJ], reporter=SilentReporter())
    finally:
        store_log.removeHandler(handler)
    assert faults == ["shard-00000", "shard-00001"] and not res.cached
    assert s3_proxy.back_up.is_set() and len(outage_retries) == RETRIES  # the outage was met with RETRIES retries
    assert s3_proxy.refused > 0  # ... of connections that really were refused
    assert s3_proxy.thawed.is_set() and s3_proxy.frozen_requests == 1  # a request waited on the frozen server
    retries = [m for r in caplog.records if (m := re.search(r"transient \w+; retry (\d+) in ([\d.]+) s",
                                                            r.getMessage()))]
    assert len(retries) >= RETRIES, "the outage should have been met with retries"
    policy = RetryPolicy.from_env()
    for m in retries:  # each retry waited its exponential backoff: base * 2**attempt, jittered down to half
        attempt, delay = int(m[1]) - 1, float(m[2])
        full = min(policy.max_delay_s, policy.base_s * 2.0 ** attempt)
        assert full * 0.5 - 0.01 <= delay <= full + 0.01, m[0]
    assert all(S3_SECRET not in r.getMessage() for r in caplog.records)
    art = open_store(cfg).artifact(TRAJ, res.fingerprint)
    assert_same_trajectories(art)


def test_s3_endpoint_gone_for_good_fails_clearly_leaves_nothing_complete_and_the_next_run_resumes(
        s3_endpoint, s3_proxy, monkeypatch):
    reference()
    monkeypatch.setenv("TLCM_STORE_RETRY_TOTAL_S", "1.5")
    bucket = s3_endpoint.make_bucket()
    cfg = fault_config(f"s3://{bucket}/artifacts")
    real = Artifact.mark_done

    def mark_done(self, name, info=None):
        real(self, name, info)
        if name == "shard-00000":
            s3_proxy.stop()  # and it does not come back during this run

    monkeypatch.setattr(Artifact, "mark_done", mark_done)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError) as err:
        run_pipeline(cfg, stages=[TRAJ], reporter=SilentReporter())
    assert time.monotonic() - t0 < 45  # bounded: a few operations x the 1.5 s budget
    msg = str(err.value)
    assert f"s3://{bucket}/artifacts" in msg and s3_proxy.url in msg and "TLCM_STORE_RETRY_TOTAL_S" in msg
    assert "rerun" in msg and S3_SECRET not in msg + repr(err.value)

    monkeypatch.setattr(Artifact, "mark_done", real)
    s3_proxy.start()
    art = open_store(cfg).artifact(TRAJ, plan(cfg)[TRAJ].fingerprint)
    assert not art.exists() and not art.is_complete()  # nothing half-written is marked complete
    assert {m for m in art.done_markers() if m.startswith("shard-")} == {"shard-00000"}
    ref = ref_artifact(TRAJ)
    for name in ("x_hi", "x_lo", "seed"):  # what is marked done is really there
        assert art.open_array(name)[:SHARD].tobytes() == ref.open_array(name)[:SHARD].tobytes()

    import tlcm_core.stages.teacher_trajectories as traj

    computed, compute = [], traj.compute_shard
    monkeypatch.setattr(traj, "compute_shard", lambda *a, **k: computed.append(a[4]) or compute(*a, **k))
    (res,) = run_pipeline(cfg, stages=[TRAJ], reporter=SilentReporter())
    assert not res.cached and computed == [16, 32]  # resumed after the marked shard
    assert_same_trajectories(art)


# ----------------------------------------------------------------------------------------------------------------
# 3. Corruption


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _forge_manifest_checksum(path: Path) -> None:
    m = json.loads(path.read_text())
    rel = next(r for r in m["files"] if r.endswith(".safetensors"))
    m["files"][rel]["sha256"] = "0" * 64
    path.write_text(json.dumps(m))


CORRUPTIONS = {
    # name: (stage whose artifact is damaged, file, damage, stages to run, file the error must name)
    "truncated-zarr-chunk": (TRAJ, "x_hi/c/1/0/0/0", _truncate, [TRAJ, MLCD], "x_hi/c/1/0/0/0"),
    "altered-zarr-chunk": (TRAJ, "x_lo/c/2/0/0/0", _flip, [TRAJ, MLCD], "x_lo/c/2/0/0/0"),
    "altered-zarr-chunk-seen-by-the-next-stage": (TRAJ, "t_hi/c/0", _flip, [MLCD], "t_hi/c/0"),
    "truncated-safetensors": (MLCD, "lora.safetensors", _truncate, [TRAJ, MLCD], "lora.safetensors"),
    "altered-safetensors": (MLCD, "lora.safetensors", _flip, [MLCD], "lora.safetensors"),
    "truncated-manifest": (MLCD, "manifest.json", _truncate, [MLCD], "manifest.json"),
    "altered-manifest": (MLCD, "manifest.json", _forge_manifest_checksum, [MLCD], "lora.safetensors"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_is_reported_with_the_artifact_uri_and_never_used(tmp_path, kind, monkeypatch):
    reference()
    stage, rel, damage, stages, named = CORRUPTIONS[kind]
    store_dir = tmp_path / "store"
    copy_artifact(TRAJ, store_dir)
    copy_artifact(MLCD, store_dir)
    cfg = fault_config(str(store_dir))
    p = plan(cfg)
    store = open_store(cfg)
    art = store.artifact(stage, p[stage].fingerprint)
    damage(Path(art.uri) / rel)
    if stages == [MLCD] and stage == TRAJ:  # the damaged artifact is an input: MLCD must not train on it
        shutil.rmtree(store.artifact(MLCD, p[MLCD].fingerprint).uri)

    import tlcm_core.consistency as consistency
    import tlcm_core.models as models

    def used(*a, **k):
        raise AssertionError("a corrupt artifact was used")

    for mod in (models, consistency):
        monkeypatch.setattr(mod, "load_unet", used)
    before = _snapshot(store_dir)
    with pytest.raises(CorruptArtifactError) as err:
        run_pipeline(cfg, stages=stages, reporter=SilentReporter())
    msg = str(err.value)
    assert art.uri in msg and named in msg
    assert not art.is_complete("checksum")
    assert _snapshot(store_dir) == before  # nothing was trained, written or committed on the damaged data


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("rel", ["weights.safetensors", "state.pt"])
def test_a_corrupt_training_checkpoint_is_refused_not_resumed(tmp_path, rel):
    reference()
    store_dir = tmp_path / "store"
    copy_artifact(TRAJ, store_dir)
    copy_artifact(MLCD, store_dir)
    cfg = fault_config(str(store_dir))
    art = open_store(cfg).artifact(MLCD, plan(cfg)[MLCD].fingerprint)
    for f in ("manifest.json", "lora.safetensors", "train_log.jsonl"):  # back to a partial run with checkpoints
        os.remove(Path(art.uri) / f)
    latest = art.read_json("checkpoints/latest.json")
    assert latest["step"] == 6
    _flip(Path(art.uri) / latest["dir"] / rel)
    with pytest.raises(CorruptArtifactError) as err:
        run_pipeline(cfg, reporter=SilentReporter())
    assert art.uri in str(err.value) and f"{latest['dir']}/{rel}" in str(err.value)
    assert not art.exists()


def test_sigterm_during_tlcm_distill_stops_the_ephemeral_prefect_server_and_the_rerun_resumes(tmp_path):
    """`kill PID` on `tlcm distill` (no Prefect server configured: Prefect starts a temporary API server as a child
    process) ends the command and that child with it -- nothing is orphaned -- and the rerun completes."""
    import subprocess
    import sys

    import psutil

    from flows import EPHEMERAL_STARTUP_TIMEOUT_S

    store = tmp_path / "store"
    # What the test relies on, set here rather than inherited: no Prefect API and no other Prefect setting from the
    # caller (so `tlcm` starts the temporary server, with its own start-up budget, from a fresh PREFECT_HOME).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_ENABLED="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "flows.cli", "distill", "--config", "toy-fast", "--stages", TRAJ, "--json"]
    for kv in (f"store.url={store}", f"teacher.source={tiny_teacher_dir()}", "trajectories.num_samples=512",
               "trajectories.shard_size=64", "trajectories.batch_size=32"):
        cmd += ["--set", kv]
    root = Path(__file__).parent.parent
    p = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    parent = psutil.Process(p.pid)

    def server_children() -> list:
        out = []
        for c in parent.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "uvicorn" in c.cmdline():
                    out.append(c)
        return out

    try:
        children: list = []

        def server_up_and_a_shard_committed() -> bool:
            nonlocal children
            assert p.poll() is None, f"tlcm distill exited ({p.returncode}) before a shard was committed"
            children = parent.children(recursive=True)
            return bool(server_children()) and any(f.is_file() for f in store.rglob("_markers/*"))

        # generous: the server's start-up budget (EPHEMERAL_STARTUP_TIMEOUT_S) plus a teacher load and a shard
        wait_for(server_up_and_a_shard_committed, EPHEMERAL_STARTUP_TIMEOUT_S + 300,
                 "the temporary Prefect server and a committed shard", poll=0.2)
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=60)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after SIGTERM: {[c.cmdline() for c in alive]}"
        assert code == 128 + signal.SIGTERM  # exited through SystemExit (cleanup ran), not killed by the signal
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert not any(store.rglob("manifest.json")), "the interrupted run must not have committed the stage"
    assert any(f.is_file() for f in store.rglob("_markers/*")), "shards finished before the signal are kept"
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (result,) = json.loads(done.stdout)
    assert result["stage"] == TRAJ and not result["cached"]
    assert ArtifactStore(str(store)).artifact(TRAJ, result["fingerprint"]).manifest(verify="checksum").stage == TRAJ


def test_tlcm_gives_the_temporary_prefect_server_a_slow_machine_start_up_budget(tmp_path):
    """Prefect's 20 s default for its temporary API server to answer is too short on a busy 2-core machine: `tlcm`
    raises it before Prefect is imported, unless a Prefect API is configured or the user chose a budget."""
    import subprocess
    import sys

    from flows import EPHEMERAL_STARTUP_TIMEOUT_S, prefect_startup_env

    key = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    for env, want in (({}, str(EPHEMERAL_STARTUP_TIMEOUT_S)), ({key: "30"}, "30"),
                      ({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, None)):
        prefect_startup_env(env)
        assert env.get(key) == want, env
    assert EPHEMERAL_STARTUP_TIMEOUT_S >= 120
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    probe = ("import flows.cli  # the `tlcm` entry point: importing the flows package sets the budget\n"
             "from prefect.settings import get_current_settings\n"
             "print(get_current_settings().server.ephemeral.startup_timeout_seconds)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=Path(__file__).parent.parent,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(EPHEMERAL_STARTUP_TIMEOUT_S)  # the installed Prefect reads this setting
