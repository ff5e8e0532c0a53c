"""Shared fixtures: a real S3 endpoint on loopback (moto server) and artifact stores on it or on tmp."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # measured 7-14x faster on our 2 shared cores

import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard dependency; keep conftest importable anyway
    pass

from tlcm_core.progress import SilentReporter
from tlcm_core.store import ArtifactStore

# Dummy credentials; the secret is distinctive so tests can assert that it never leaks.
S3_KEY = "tlcm-test-key"
S3_SECRET = "tlcm-test-secret-5f1c9e27b3"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoEndpoint:
    """A moto S3 server in its own process on a loopback port.

    ``stop()`` kills it (connections refused; moto keeps state in memory, so buckets are gone after
    ``start()``); ``pause()``/``resume()`` freeze it with SIGSTOP/SIGCONT (connections hang, state kept).
    """

    host = "127.0.0.1"

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def storage_options(self) -> dict:
        return {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": self.url}

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited ({self._proc.returncode}); port {self.port} taken?")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def pause(self) -> None:
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGCONT)

    def make_bucket(self, name: str | None = None) -> str:
        import fsspec

        name = name or f"tlcm-{uuid.uuid4().hex[:12]}"
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **self.storage_options)
        fs.mkdir(name)
        return name


class RecordingReporter(SilentReporter):
    """Keeps, in order, what the code under test reported: ("log", message), ("progress", key, done, total),
    ("table", key, rows) and ("image", key, png)."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple] = []

    def log(self, message):
        self.events.append(("log", message))

    def progress(self, key, done, total, **metrics):
        self.events.append(("progress", key, done, total))

    def table(self, key, rows, description=""):
        self.events.append(("table", key, rows))

    def image(self, key, png, description=""):
        self.events.append(("image", key, png))

    @property
    def logs(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "log"]

    @property
    def published(self) -> list[tuple]:
        """The tables and images, in order."""
        return [e for e in self.events if e[0] in ("table", "image")]

    def progress_of(self, key: str) -> list[tuple[int, int]]:
        return [(e[2], e[3]) for e in self.events if e[0] == "progress" and e[1] == key]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint (moto server) for the session; AWS_* variables point at it while it runs."""
    endpoint = MotoEndpoint()
    endpoint.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in endpoint.env.items():
                mp.setenv(k, v)
            yield endpoint
    finally:
        endpoint.stop()


@pytest.fixture
def local_store(tmp_path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


@pytest.fixture
def s3_store(s3_endpoint) -> ArtifactStore:
    if not s3_endpoint.running:  # a fault test may have stopped it
        s3_endpoint.start()
    bucket = s3_endpoint.make_bucket()
    return ArtifactStore(f"s3://{bucket}/artifacts", storage_options=s3_endpoint.storage_options)
