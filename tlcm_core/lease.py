"""A lease on an artifact: one worker computes it, the others wait for its manifest or take over a stale lease.

The lease is a small JSON file (`_lease.json`) in the artifact folder: the owner's id, who it is (host, boot
id, pid namespace, pid and process start time) and an expiry time, renewed by a heartbeat thread while the
work runs. It is created exclusively (a hard link on a local disk, a conditional `If-None-Match: *` PUT on
S3), then read back after a settle delay, so of two workers starting at once exactly one computes.

A lease is stale, and is taken over, when
- it has expired: its worker stopped renewing (killed, preempted, partitioned) for `ttl_s`;
- its worker ran on this machine and that process is gone (SIGKILL, OOM): detected at once, without waiting
  for the expiry;
- it belongs to this very process but to no lease it still holds (an attempt that failed and could not
  remove its lease, e.g. while the store was unreachable);
- it is unreadable.

Settings (seconds): `TLCM_LEASE_TTL_S` (default 120), `TLCM_LEASE_POLL_S` (2), `TLCM_LEASE_SETTLE_S` (0.5).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import UserError
from .store import env_seconds

LEASE_FILE = "_lease.json"

# owners of the leases this process holds right now (a lease of this process not listed here is an orphan)
_HELD: set[str] = set()
_HELD_LOCK = threading.Lock()


class LeaseTimeout(UserError, TimeoutError):
    pass


class LeaseLost(UserError, RuntimeError):
    """Another worker took the lease over while this one computed (its heartbeats did not land for `ttl_s`)."""


class Lease:
    """What `artifact_lease` yields: true when this process holds the lease and must do the work."""

    def __init__(self, art, owner: str, held: bool, ttl_s: float):
        self.art, self.owner, self.held, self.ttl_s = art, owner, held, ttl_s
        self.lost_to: str | None = None

    def __bool__(self) -> bool:
        return self.held

    @property
    def lost(self) -> bool:
        return self.lost_to is not None

    def check(self) -> None:
        """Call before committing: raise LeaseLost if another worker took the artifact over meanwhile."""
        if self.lost:
            raise LeaseLost(
                f"lost the lease on {self.art.uri} to {self.lost_to} while computing it (no heartbeat landed for "
                f"{self.ttl_s:g} s: a stalled process or an unreachable store, see TLCM_LEASE_TTL_S); not "
                "committing. The other worker's result is the same artifact: rerun to reuse it.")


def _now() -> float:
    return time.time()


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if no such process
    or a zombie."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 else None


def process_identity(pid: int | None = None) -> dict:
    """Who holds a lease: enough to tell, on the same machine, whether that process still runs."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "boot": _read_text("/proc/sys/kernel/random/boot_id"),
            "pidns": _pidns(), "pid": pid, "start": _proc_start(pid)}


def _same_machine(ident: dict, me: dict) -> bool:
    if me["boot"] is None:  # no /proc (macOS): the host name is all we have
        return ident.get("host") == me["host"] and ident.get("boot") is None
    return ident.get("boot") == me["boot"] and ident.get("pidns") == me["pidns"]


def _process_gone(ident: dict, me: dict) -> bool:
    """True only when we can tell for sure that the lease's process no longer runs."""
    pid = ident.get("pid")
    if not isinstance(pid, int) or not _same_machine(ident, me):
        return False
    if me["boot"] is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    start = _proc_start(pid)
    return start is None or (ident.get("start") is not None and start != ident.get("start"))


def read_lease(art) -> dict | None:
    """The lease record, None when there is none; {"torn": True} when it cannot be parsed."""
    try:
        raw = art.read_bytes(LEASE_FILE)
    except FileNotFoundError:
        return None
    try:
        cur = json.loads(raw)
        if not isinstance(cur, dict):
            raise ValueError("not an object")
        return cur
    except (ValueError, UnicodeDecodeError):
        return {"torn": True}


def stale_reason(cur: dict, me: dict | None = None, now: float | None = None) -> str | None:
    """Why the lease can be taken over, or None while it is live."""
    me = me or process_identity()
    now = _now() if now is None else now
    if cur.get("torn"):
        return "it is unreadable"
    ident = cur.get("process") or {}
    if _same_machine(ident, me) and ident.get("pid") == me["pid"] and ident.get("start") == me["start"]:
        with _HELD_LOCK:
            if cur.get("owner") not in _HELD:
                return "it is left over from an earlier attempt in this process"
        return None
    if _process_gone(ident, me):
        return f"its process {ident.get('pid')} on {ident.get('host')} is gone"
    expires = cur.get("expires")
    if not isinstance(expires, (int, float)) or expires < now:
        return "it expired (its worker stopped renewing it)"
    return None


def _record(owner: str, ttl_s: float, ident: dict) -> bytes:
    return json.dumps({"owner": owner, "expires": _now() + ttl_s, "ttl_s": ttl_s, "process": ident}).encode()


def _create_exclusive(art, data: bytes) -> bool:
    """Write the lease only if there is none; False if one exists."""
    if art.store.is_local:
        path = art.path(LEASE_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if the lease exists: readers never see a half-written one
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    try:
        art.fs.pipe_file(art.path(LEASE_FILE), data, mode="create")  # S3: PUT with If-None-Match: *
        return True
    except FileExistsError:
        return False
    except TypeError:  # a filesystem without exclusive create: the read-back after the settle delay decides
        art.write_bytes(LEASE_FILE, data)
        return True


def _remove(art) -> None:
    try:
        art.fs.rm_file(art.path(LEASE_FILE))
    except FileNotFoundError:
        pass


def _acquire(art, owner: str, me: dict, *, ttl_s: float, settle_s: float, poll_s: float, wait_timeout_s: float,
             done: Callable[[], bool] | None, log: Callable[[str], None]) -> bool:
    """Wait until this process holds the lease (True) or `done()` (False); stale leases are taken over."""
    deadline = _now() + wait_timeout_s
    announced = False
    while True:
        if done is not None and done():
            return False
        cur = read_lease(art)
        if cur is not None and cur.get("owner") != owner:
            why = stale_reason(cur, me)
            if why is not None:
                log(f"taking over the lease of {cur.get('owner', '?')} on {art.uri}: {why}")
                _remove(art)
                cur = None
        if cur is None:
            with _HELD_LOCK:
                _HELD.add(owner)  # before it is visible, so this process never sees its own lease as orphaned
            if _create_exclusive(art, _record(owner, ttl_s, me)):
                time.sleep(settle_s)  # let a concurrent taker's writes land, then see who won
                cur = read_lease(art)
                if cur is not None and cur.get("owner") == owner:
                    return True
            with _HELD_LOCK:
                _HELD.discard(owner)
            cur = read_lease(art)
        if not announced:
            holder = cur.get("owner") if cur else "another worker"
            log(f"{art.uri} is being computed by {holder}; waiting for it (or for its lease to go stale)")
            announced = True
        if _now() > deadline:
            raise LeaseTimeout(f"gave up waiting for {art.uri} after {wait_timeout_s:.0f} s (lease held by "
                               f"{cur.get('owner') if cur else '?'})")
        time.sleep(poll_s)


@contextmanager
def artifact_lease(art, *, ttl_s: float | None = None, heartbeat_s: float | None = None,
                   settle_s: float | None = None, poll_s: float | None = None,
                   wait_timeout_s: float = 24 * 3600.0, done: Callable[[], bool] | None = None,
                   log: Callable[[str], None] = lambda m: None) -> Iterator[Lease]:
    """Hold the artifact's lease for the duration of the block.

    Yields a Lease that is true when this process holds the lease and must do the work (call `check()` before
    committing), or false when `done()` became true while waiting (another worker completed the artifact: use
    it). Raises LeaseTimeout after wait_timeout_s.
    """
    ttl_s = ttl_s or env_seconds("TLCM_LEASE_TTL_S", 120.0, allow_zero=False)
    poll_s = poll_s or env_seconds("TLCM_LEASE_POLL_S", 2.0, allow_zero=False)
    settle_s = env_seconds("TLCM_LEASE_SETTLE_S", 0.5, allow_zero=False) if settle_s is None else settle_s
    settle_s = min(settle_s, ttl_s / 4)  # the lease must outlive the settle delay before its first renewal
    heartbeat_s = min(heartbeat_s or ttl_s / 4, ttl_s / 4)
    me = process_identity()
    owner = f"{me['host']}:{me['pid']}:{uuid.uuid4().hex[:8]}"
    if not _acquire(art, owner, me, ttl_s=ttl_s, settle_s=settle_s, poll_s=poll_s, wait_timeout_s=wait_timeout_s,
                    done=done, log=log):
        yield Lease(art, owner, False, ttl_s)
        return

    lease = Lease(art, owner, True, ttl_s)
    stop = threading.Event()

    def renew() -> bool:
        cur = read_lease(art)
        if cur is None or cur.get("owner") != owner:
            lease.lost_to = (cur or {}).get("owner", "nobody")
            log(f"lost the lease on {art.uri} to {lease.lost_to} (missed heartbeats for over {ttl_s:g} s?)")
            return False
        art.write_bytes(LEASE_FILE, _record(owner, ttl_s, me))
        return True

    def beat():
        while not stop.wait(heartbeat_s):
            try:
                if not renew():
                    return
            except Exception:  # a missed heartbeat only shortens the lease
                pass

    try:
        renew()  # a full ttl from now, whatever the settle delay took
    except Exception:  # the heartbeat tries again
        pass
    th = threading.Thread(target=beat, daemon=True, name="tlcm-lease")
    th.start()
    try:
        yield lease
    finally:
        stop.set()
        th.join(timeout=5)
        try:
            cur = read_lease(art)
            if cur is not None and cur.get("owner") == owner:
                _remove(art)
        except Exception:  # e.g. the store is unreachable: the lease goes stale (see stale_reason)
            pass
        with _HELD_LOCK:
            _HELD.discard(owner)
