"""A lease on an artifact: one worker computes it, others wait for its manifest or take over a stale lease.

The lease is a small JSON file (`_lease.json`) in the artifact folder holding an owner id and an expiry time,
renewed by a heartbeat thread while the work runs. Object stores have no portable create-if-absent, so
acquisition writes the lease and reads it back after a settle delay: the last writer wins, the others see a
foreign owner and wait. A worker that dies stops renewing; its lease expires after `ttl_s`.
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

LEASE_FILE = "_lease.json"


class LeaseTimeout(TimeoutError):
    pass


def _now() -> float:
    return time.time()


def read_lease(art) -> dict | None:
    try:
        return json.loads(art.read_bytes(LEASE_FILE))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # a torn lease counts as none


@contextmanager
def artifact_lease(art, *, ttl_s: float = 120.0, heartbeat_s: float | None = None, settle_s: float = 0.5,
                   poll_s: float = 2.0, wait_timeout_s: float = 24 * 3600.0,
                   done: Callable[[], bool] | None = None, log: Callable[[str], None] = lambda m: None
                   ) -> Iterator[bool]:
    """Hold the artifact's lease for the duration of the block.

    Yields True when this process holds the lease and must do the work, or False when `done()` became true
    while waiting (another worker completed the artifact: use it). Raises LeaseTimeout after wait_timeout_s.
    """
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    heartbeat_s = heartbeat_s or ttl_s / 4
    deadline = _now() + wait_timeout_s
    announced = False
    while True:
        if done is not None and done():
            yield False
            return
        cur = read_lease(art)
        if cur is None or cur.get("expires", 0) < _now() or cur.get("owner") == owner:
            if cur is not None and cur.get("owner") != owner:
                log(f"taking over the stale lease of {cur.get('owner')} on {art.uri}")
            art.write_bytes(LEASE_FILE, json.dumps({"owner": owner, "expires": _now() + ttl_s}).encode())
            time.sleep(settle_s)  # let a concurrent writer's PUT land, then see who won
            cur = read_lease(art)
            if cur is not None and cur.get("owner") == owner:
                break
        if not announced:
            log(f"{art.uri} is being computed by {cur.get('owner') if cur else 'another worker'}; waiting")
            announced = True
        if _now() > deadline:
            raise LeaseTimeout(f"gave up waiting for {art.uri} after {wait_timeout_s:.0f} s (lease held by "
                               f"{cur.get('owner') if cur else '?'})")
        time.sleep(poll_s)

    stop = threading.Event()

    def beat():
        while not stop.wait(heartbeat_s):
            try:
                art.write_bytes(LEASE_FILE, json.dumps({"owner": owner, "expires": _now() + ttl_s}).encode())
            except Exception:  # a missed heartbeat only shortens the lease
                pass

    th = threading.Thread(target=beat, daemon=True, name="tlcm-lease")
    th.start()
    try:
        yield True
    finally:
        stop.set()
        th.join(timeout=5)
        try:
            cur = read_lease(art)
            if cur is not None and cur.get("owner") == owner:
                art.fs.rm(art.path(LEASE_FILE))
        except Exception:
            pass
