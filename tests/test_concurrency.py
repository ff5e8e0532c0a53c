"""Two runs of one stage and fingerprint at once, and leases left behind by dead workers (tests/README.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest
from test_faults import (TRAJ, assert_same_trajectories, fault_config, forked_worker, hang, reference, wait_for)

from tlcm_core.lease import LEASE_FILE, LeaseTimeout, artifact_lease, read_lease
from tlcm_core.pipeline import open_store, plan, run_stage
from tlcm_core.progress import SilentReporter
from tlcm_core.store import Artifact


def _run_when_told(cfg, go, out) -> None:
    wait_for(lambda: os.path.exists(go), 60, "the start signal", poll=0.002)
    res = run_stage(cfg, TRAJ, reporter=SilentReporter())
    with open(out, "w") as f:
        json.dump({"pid": os.getpid(), "cached": res.cached}, f)


def test_two_processes_run_one_stage_at_once_one_computes_the_other_reuses(tmp_path, monkeypatch):
    reference()
    # a lease that lives 3 s unless renewed: the stage takes longer, so only heartbeats keep the waiter out
    monkeypatch.setenv("TLCM_LEASE_TTL_S", "3")
    monkeypatch.setenv("TLCM_LEASE_POLL_S", "0.1")
    cfg = fault_config(str(tmp_path / "store"))
    writes = tmp_path / "writes.log"

    def record(what: str) -> None:
        fd = os.open(writes, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()} {what}\n".encode())
        finally:
            os.close(fd)

    import zarr

    set_rows, mark_done, commit = zarr.Array.__setitem__, Artifact.mark_done, Artifact.commit
    write_bytes = Artifact.write_bytes
    monkeypatch.setattr(zarr.Array, "__setitem__",
                        lambda self, k, v: record(f"write {self.store_path}") or set_rows(self, k, v))
    monkeypatch.setattr(Artifact, "commit", lambda self, **k: record("commit") or commit(self, **k))

    def slow_first_shard(self, name, info=None):
        # the stage must outlive the lease's ttl, so that only heartbeats keep the waiter out: after its first
        # shard the computing process waits out the ttl (a stretch of the stage, not a wait for the other process)
        record(f"mark {name}")
        if name == "shard-00000":
            time.sleep(3.5)
        return mark_done(self, name, info)

    def lease_writes(self, rel, data, *a, **k):
        if rel == LEASE_FILE:
            record("lease renewed")
        return write_bytes(self, rel, data, *a, **k)

    monkeypatch.setattr(Artifact, "mark_done", slow_first_shard)
    monkeypatch.setattr(Artifact, "write_bytes", lease_writes)

    go, out = tmp_path / "go", tmp_path / "child.json"
    with forked_worker(_run_when_told, cfg, str(go), str(out)) as p:
        go.touch()
        t0 = time.monotonic()
        mine = run_stage(cfg, TRAJ, reporter=SilentReporter())
        wait_for(out.exists, 120, "the other run's result", p)
        p.join(30)
        assert p.exitcode == 0
    took = time.monotonic() - t0
    theirs = json.loads(out.read_text())
    assert sorted([mine.cached, theirs["cached"]]) == [False, True]  # one computed, the other reused
    computer = os.getpid() if not mine.cached else theirs["pid"]
    lines = [ln.split(" ", 1) for ln in writes.read_text().splitlines()]
    assert {pid for pid, _ in lines} == {str(computer)}  # every chunk, marker and the commit: one process
    assert sum(what == "commit" for _, what in lines) == 1
    # the stage outlived the ttl: only the heartbeats' renewals (at ttl / 4) kept the waiter from taking over
    assert took > 3 + 0.5 and sum(what == "lease renewed" for _, what in lines) >= 3
    art = open_store(cfg).artifact(TRAJ, mine.fingerprint)
    assert_same_trajectories(art)
    assert not art.exists_file(LEASE_FILE)


def _hold_lease(art, signal_file) -> None:
    with artifact_lease(art, ttl_s=600):
        hang(signal_file)


def test_the_lease_of_a_killed_worker_is_taken_over_at_once(tmp_path):
    cfg = fault_config(str(tmp_path / "store"))
    art = open_store(cfg).artifact(TRAJ, plan(cfg)[TRAJ].fingerprint)
    with forked_worker(_hold_lease, art, tmp_path / "holding") as p:
        wait_for((tmp_path / "holding").exists, 60, "the worker to hold the lease", p)
        held = read_lease(art)
        assert held["process"]["pid"] == p.pid and held["expires"] > time.time() + 500
        os.killpg(p.pid, signal.SIGKILL)
        p.join(10)
    said: list[str] = []
    t0 = time.monotonic()
    with artifact_lease(art, poll_s=0.1, log=said.append) as mine:
        assert mine and read_lease(art)["process"]["pid"] == os.getpid()
    assert time.monotonic() - t0 < 10  # not the 600 s the dead worker's lease announced
    assert any("taking over" in s and f"process {p.pid}" in s and "gone" in s for s in said), said
    assert read_lease(art) is None


def test_a_stale_lease_from_another_machine_expires_and_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("TLCM_LEASE_POLL_S", "0.1")
    store = open_store(fault_config(str(tmp_path / "store")))
    art = store.artifact("mlcd", "5" * 16)
    foreign = {"owner": "gpu-node-7:4242:deadbeef", "expires": time.time() + 1.5, "ttl_s": 120,
               "process": {"host": "gpu-node-7", "boot": "another-boot-id", "pidns": "pid:[1]", "pid": 4242,
                           "start": "1"}}
    art.write_bytes(LEASE_FILE, json.dumps(foreign).encode())
    said: list[str] = []
    t0 = time.monotonic()
    with artifact_lease(art, log=said.append) as mine:
        waited = time.monotonic() - t0
        assert mine and read_lease(art)["owner"] != foreign["owner"]
    assert 1.3 < waited < 30  # waited for the expiry, not for ever
    assert any("waiting" in s for s in said) and any("expired" in s for s in said)
    assert read_lease(art) is None  # released


def test_a_live_lease_is_waited_for_and_the_wait_is_bounded(tmp_path):
    store = open_store(fault_config(str(tmp_path / "store")))
    art = store.artifact("mlcd", "6" * 16)
    stop = threading.Event()
    inside = threading.Event()

    def holder():
        with artifact_lease(art, ttl_s=0.5, poll_s=0.05) as mine:
            assert mine
            inside.set()
            stop.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(10)
        owner = read_lease(art)["owner"]
        with pytest.raises(LeaseTimeout) as err:  # renewed by heartbeats: never stale, so we give up waiting
            with artifact_lease(art, ttl_s=0.5, poll_s=0.05, wait_timeout_s=1.5):
                pytest.fail("took a live lease")
        assert art.uri in str(err.value) and owner in str(err.value)
        # and a waiter that sees the artifact completed meanwhile gets told to reuse it
        with artifact_lease(art, poll_s=0.05, done=lambda: True) as mine:
            assert not mine
    finally:
        stop.set()
        t.join(10)
    assert read_lease(art) is None


def test_a_torn_or_foreign_lease_file_never_blocks_for_ever(tmp_path):
    art = open_store(fault_config(str(tmp_path / "store"))).artifact("mlcd", "7" * 16)
    art.write_bytes(LEASE_FILE, b"{not json")
    said: list[str] = []
    with artifact_lease(art, poll_s=0.05, log=said.append) as mine:
        assert mine and read_lease(art)["process"]["host"] == socket.gethostname()
    assert any("unreadable" in s for s in said)
