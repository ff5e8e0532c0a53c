"""Content-addressed artifact store on any fsspec URL (a local folder by default, ``s3://`` at scale).

An artifact lives at ``{root}/{stage}/{fingerprint}/`` and is complete exactly when its
``manifest.json`` exists there and verifies. Work in progress (zarr chunks, shard done-markers,
checkpoints) lives in the same folder and is resumed, never trusted as complete; :meth:`Artifact.commit`
hashes every file and writes the manifest last, in one atomic step (docs/artifacts.md).

Remote stores retry transient errors (unreachable endpoint, timeouts, throttling, 5xx) with exponential
backoff and jitter for a bounded time per operation (:class:`RetryPolicy`, from ``TLCM_STORE_RETRY_*``), on
the store's own requests and on zarr chunk I/O alike; past the budget a :class:`StoreUnavailableError` names
the store and the file. Permanent errors (missing file, no permission) are never retried.

Secrets (storage options, credentials) are kept out of ``repr``, exception messages and manifests.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import posixpath
import random
import re
import shutil
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import pydantic
import zarr
import zarr.errors
import zarr.storage

from .errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Artifact",
    "ArtifactStore",
    "CorruptArtifactError",
    "FileEntry",
    "IncompleteArtifactError",
    "Manifest",
    "RetryPolicy",
    "StoreError",
    "StoreUnavailableError",
    "UnsafePathError",
    "fingerprint",
    "storage_options_from_env",
]

MANIFEST_NAME = "manifest.json"
MARKERS_DIR = "_markers"
MANIFEST_FORMAT = "tlcm-artifact/1"

# Stage names, fingerprints and marker names become single path components.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HASH_BLOCK = 8 * 2**20
_SMALL_FILE = 16 * 2**20  # read in one request when hashing
_BATCH_BYTES = 128 * 2**20  # remote hashing: bytes fetched concurrently per batch

log = logging.getLogger("tlcm.store")


# ----------------------------------------------------------------------------------------------------
# Errors


class StoreError(UserError, RuntimeError):
    """The store cannot be used: unreachable, no permission, bad URL. The message says what to fix."""


class CorruptArtifactError(StoreError):
    """A manifest or a file it lists does not verify. The message names the artifact URI and the file."""


class IncompleteArtifactError(StoreError):
    """The artifact has no manifest: it was never committed (or its work is still in progress)."""


class UnsafePathError(StoreError, ValueError):
    """A relative path or URI would escape the artifact folder or the store root."""


class StoreUnavailableError(StoreError):
    """A remote store kept failing with transient errors (unreachable, timeouts, throttling, 5xx) for longer
    than the retry budget. Work written so far stays as partial work: a rerun resumes it."""


# ----------------------------------------------------------------------------------------------------
# Retries for transient remote-store errors


def env_seconds(name: str, default: float, allow_zero: bool = True) -> float:
    """A duration from the environment (unset or empty: `default`); anything else but a finite number >= 0
    (> 0 without allow_zero) is an error naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}={raw!r} must be a {'non-negative' if allow_zero else 'positive'} number of seconds")
    return v


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded in total time per operation.

    An operation is retried while the next attempt would start within ``total_s`` of the first one; delays
    grow as ``base_s * 2**attempt`` (capped at ``max_delay_s``) times a random factor in [0.5, 1].
    Defaults come from ``TLCM_STORE_RETRY_TOTAL_S``, ``TLCM_STORE_RETRY_BASE_S`` and
    ``TLCM_STORE_RETRY_MAX_DELAY_S``; ``total_s=0`` disables retries.
    """

    total_s: float = 120.0
    base_s: float = 0.2
    max_delay_s: float = 10.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(env_seconds("TLCM_STORE_RETRY_TOTAL_S", cls.total_s),
                   env_seconds("TLCM_STORE_RETRY_BASE_S", cls.base_s),
                   env_seconds("TLCM_STORE_RETRY_MAX_DELAY_S", cls.max_delay_s))

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_s * 2.0 ** attempt) * (0.5 + 0.5 * random.random())


_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_NAMES = {
    "ReadTimeoutError", "ConnectTimeoutError", "IncompleteRead", "ResponseParserError", "ClientPayloadError",
    "ServerDisconnectedError", "ClientOSError", "FSTimeoutError", "ResponseStreamingError", "ProtocolError",
    "ConnectionClosedError", "ClientConnectionResetError",
}
_TRANSIENT_CODES = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "TooManyRequestsException", "BadGateway", "GatewayTimeout",
}


def _is_transient(e: BaseException) -> bool:
    """Whether retrying might help: connection trouble, timeouts, throttling, server errors (5xx)."""
    if isinstance(e, _PERMANENT):
        return False
    if _is_connection_error(e):
        return True
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if type(x).__name__ in _TRANSIENT_NAMES:
            return True
        response = getattr(x, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
            if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return True
        x = x.__cause__ or x.__context__
    return False


def _retry_delay(policy: RetryPolicy, e: BaseException, attempt: int, t0: float, explain, what: str) -> float:
    """The wait before retry `attempt + 1` of a failed call, or re-raise: `e` is not transient, or the next try
    would start past the policy's budget (then as StoreUnavailableError with `explain`'s message)."""
    if not _is_transient(e):
        raise e
    elapsed = time.monotonic() - t0
    d = policy.delay(attempt)
    if elapsed + d > policy.total_s:
        raise StoreUnavailableError(explain(e, attempt + 1, elapsed)) from e
    log.warning("%s: transient %s; retry %d in %.2f s", what, type(e).__name__, attempt + 1, d)
    return d


def _retry_call(policy: RetryPolicy, fn: Callable[[], Any], explain: Callable[[BaseException, int, float], str],
                what: str, missing_ok_on_retry: bool = False) -> Any:
    t0, attempt = time.monotonic(), 0
    while True:
        try:
            return fn()
        except FileNotFoundError:
            if missing_ok_on_retry and attempt > 0:  # a delete whose first try landed but lost its answer
                return None
            raise
        except Exception as e:
            time.sleep(_retry_delay(policy, e, attempt, t0, explain, what))
            attempt += 1


async def _aretry_call(policy: RetryPolicy, fn: Callable[[], Any], explain, what: str,
                       missing_ok_on_retry: bool = False) -> Any:
    """_retry_call for coroutines (zarr's async store calls)."""
    import asyncio

    t0, attempt = time.monotonic(), 0
    while True:
        try:
            return await fn()
        except FileNotFoundError:
            if missing_ok_on_retry and attempt > 0:
                return None
            raise
        except Exception as e:
            await asyncio.sleep(_retry_delay(policy, e, attempt, t0, explain, what))
            attempt += 1


# fsspec methods that talk to the store and are safe to repeat (deletes: a missing file on a retry is success)
_RETRIED_METHODS = frozenset({
    "cat_file", "cat", "pipe_file", "pipe", "exists", "isfile", "isdir", "info", "ls", "find", "glob", "du",
    "size", "sizes", "rm", "rm_file", "get_file", "put_file", "get", "put", "mkdir", "makedirs", "touch",
    "head", "tail", "checksum", "modified",
})
_DELETES = frozenset({"rm", "rm_file"})


class _RetryingFS:
    """An fsspec filesystem whose request methods retry transient errors under the store's RetryPolicy."""

    def __init__(self, fs, store: ArtifactStore):
        self.__dict__["_fs"] = fs
        self.__dict__["_store"] = store

    def __getattr__(self, name: str):
        attr = getattr(self._fs, name)
        if name not in _RETRIED_METHODS or not callable(attr):
            return attr

        def call(*args, **kwargs):
            target = args[0] if args and isinstance(args[0], str) else (
                f"{len(args[0])} paths" if args and isinstance(args[0], (list, tuple)) else "")
            return _retry_call(self._store.retry, lambda: attr(*args, **kwargs),
                               lambda e, n, t: self._store._unavailable(e, n, t, name, target),
                               f"{self._store.url}: {name} {target}", missing_ok_on_retry=name in _DELETES)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._fs, name, value)

    def __repr__(self) -> str:
        return f"_RetryingFS({type(self._fs).__name__})"


class _RetryingZarrStore(zarr.storage.WrapperStore):
    """zarr chunk and metadata I/O with the same retries as the artifact store's own requests."""

    def __init__(self, store, artifact_store: ArtifactStore | None = None, url: str = ""):
        super().__init__(store)
        self._art_store = artifact_store
        self._url = url

    def _with_store(self, store):
        return type(self)(store, self._art_store, self._url)

    async def _retry(self, op: str, key: str, fn, missing_ok: bool = False):
        s = self._art_store
        target = f"{self._url}/{key}"
        return await _aretry_call(s.retry, fn, lambda e, n, t: s._unavailable(e, n, t, op, target),
                                  f"{target}: {op}", missing_ok_on_retry=missing_ok)

    async def get(self, key, prototype, byte_range=None):
        return await self._retry("read", key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        return await self._retry("read", key_ranges[0][0] if key_ranges else "",
                                 lambda: self._store.get_partial_values(prototype, key_ranges))

    async def exists(self, key):
        return await self._retry("check", key, lambda: self._store.exists(key))

    async def set(self, key, value):
        return await self._retry("write", key, lambda: self._store.set(key, value))

    async def delete(self, key):
        return await self._retry("delete", key, lambda: self._store.delete(key), missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# Fingerprints and manifests


def _canonical_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"fingerprint inputs must be plain JSON (dict/list/str/int/float/bool/None, finite floats); "
            f"resolve the config first, e.g. model.model_dump(mode='json'): {e}"
        ) from e


def fingerprint(stage: str, version: int, config: dict, inputs: dict[str, str]) -> str:
    """First 16 hex chars of sha256 over the canonical JSON of stage, version, config and inputs.

    Pass the input artifacts' *fingerprints* (not their URIs) as ``inputs`` so that a cache hit does not
    depend on where the store lives.
    """
    payload = {"stage": stage, "version": int(version), "config": config, "inputs": dict(inputs)}
    return hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()[:16]


class FileEntry(pydantic.BaseModel, extra="forbid"):
    size: int = pydantic.Field(ge=0)
    sha256: str = pydantic.Field(pattern=r"^[0-9a-f]{64}$")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """tlcm's package version, plus the git commit of the source tree when it is a checkout."""
    try:
        version = importlib.metadata.version("tlcm")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0 or not sha.stdout.strip():
            return version
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=5,
        )
        tag = "g" + sha.stdout.strip() + (".dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}{'.' if '+' in version else '+'}{tag}"


class Manifest(pydantic.BaseModel, extra="forbid"):
    format: Literal["tlcm-artifact/1"] = MANIFEST_FORMAT
    stage: str
    fingerprint: str
    version: int
    config: dict
    inputs: dict[str, str]
    code_version: str
    created: pydantic.AwareDatetime = pydantic.Field(default_factory=lambda: datetime.now(timezone.utc))
    files: dict[str, FileEntry]
    summary: dict = {}

    @pydantic.field_validator("created")
    @classmethod
    def _to_utc(cls, v: datetime) -> datetime:
        return v.astimezone(timezone.utc)


# ----------------------------------------------------------------------------------------------------
# Helpers


def storage_options_from_env() -> dict:
    """s3fs options from the standard AWS variables (only those that are set).

    The endpoint is mapped to ``endpoint_url`` explicitly rather than left to botocore, whose support for
    ``AWS_ENDPOINT_URL*`` depends on its version.
    """
    opts: dict[str, Any] = {}
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = env["AWS_ACCESS_KEY_ID"]
    if env.get("AWS_SECRET_ACCESS_KEY"):
        opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
    if env.get("AWS_SESSION_TOKEN"):
        opts["token"] = env["AWS_SESSION_TOKEN"]
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def _secret_values(opts: dict) -> list[str]:
    out = []
    for k in ("secret", "key", "token", "password", "aws_secret_access_key", "aws_session_token"):
        v = opts.get(k)
        if isinstance(v, str) and len(v) >= 4:
            out.append(v)
    ck = opts.get("client_kwargs") or {}
    for k in ("aws_secret_access_key", "aws_session_token", "aws_access_key_id"):
        v = ck.get(k)
        if isinstance(v, str) and len(v) >= 4:
            out.append(v)
    return out


def _safe_endpoint(endpoint: str | None) -> str:
    if not endpoint:
        return "the default AWS endpoint"
    return re.sub(r"//[^/@]*@", "//", endpoint)  # drop any user:password@


def _clean_rel(rel: str) -> str:
    """Normalize a relative path inside an artifact; refuse absolute paths and '..'."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"expected a non-empty relative path, got {rel!r}")
    if rel.startswith(("/", "\\")) or "\\" in rel or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", rel):
        raise UnsafePathError(f"{rel!r} must be a relative path with '/' separators")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"{rel!r} must not contain '..'")
    if not parts:
        raise UnsafePathError(f"{rel!r} does not name a file")
    return "/".join(parts)


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UnsafePathError(f"{kind} {name!r} must match {_NAME_RE.pattern} (one path component)")
    return name


def _is_excluded(rel: str) -> bool:
    """Files that are bookkeeping or in flight, never part of a committed artifact."""
    top = rel.split("/", 1)[0]
    base = rel.rsplit("/", 1)[-1]
    return (
        rel == MANIFEST_NAME
        or top in (MARKERS_DIR, "checkpoints")
        or top.startswith("_lease")
        or base.endswith((".tmp", ".partial"))  # ours, and zarr LocalStore's in-flight writes
    )


def _numpy_dtype(dtype: Any):
    import numpy as np

    if type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        import torch

        try:
            return torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError as e:
            raise TypeError(f"{dtype} has no numpy/zarr equivalent; store e.g. float32 or float16") from e
    return np.dtype(dtype)


def _same_fill(a: Any, b: Any) -> bool:
    import numpy as np

    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))
    except TypeError:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its ``__metadata__`` keys in sorted order.

    safetensors writes the metadata map in hash order, which changes from one process to the next: equal tensors
    and metadata would give files with different sha256 and break content checksums between equal runs.
    """
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


# ----------------------------------------------------------------------------------------------------
# Store


class ArtifactStore:
    """Artifacts under one root URL: ``{url}/{stage}/{fingerprint}/``."""

    def __init__(self, url: str, storage_options: dict | None = None, retry: RetryPolicy | None = None):
        self.retry = retry if retry is not None else RetryPolicy.from_env()
        if not isinstance(url, str) or not url.strip():
            raise StoreError(f"store URL must be a non-empty string, got {url!r}")
        url = url.strip()
        protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
        self._protocol = protocol
        if protocol in ("file", "local"):
            path = url.split("://", 1)[1] if "://" in url else url
            path = os.path.abspath(os.path.expanduser(path))
            self.is_local = True
            self._opts: dict = {}
            self.fs = fsspec.filesystem("file")
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the local store folder {path}: {e.strerror}; "
                                 "pick a writable path") from None
            if not os.path.isdir(path):
                raise StoreError(f"local store {path} exists but is not a folder")
            self._root = path.rstrip("/") or "/"
            self.url = self._root
        else:
            self.is_local = False
            if protocol in ("s3", "s3a"):
                opts = dict(storage_options) if storage_options is not None else storage_options_from_env()
                # Listings are shared between workers; a cached listing would hide their markers/manifests.
                opts.setdefault("use_listings_cache", False)
                # One place retries, with a bounded budget (RetryPolicy): botocore makes a single attempt per
                # request unless the caller configured its retries, and gives up connecting after 10 s.
                config = dict(opts.get("config_kwargs") or {})
                config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
                config.setdefault("connect_timeout", 10)
                opts["config_kwargs"] = config
            else:
                opts = dict(storage_options or {})
            self._opts = opts
            try:
                self.fs, root = fsspec.core.url_to_fs(url, **opts)
            except (ImportError, ValueError) as e:
                raise StoreError(f"cannot open store {url}: {self._redact(str(e))}") from None
            root = root.rstrip("/")
            if not root:
                raise StoreError(f"store URL {url} names no bucket/container")
            if ".." in root.split("/"):
                raise UnsafePathError(f"store URL {url} must not contain '..'")
            self._root = root
            self.url = self.fs.unstrip_protocol(root).rstrip("/")
            if protocol == "s3a":
                self.url = "s3a://" + root
            self.fs = _RetryingFS(self.fs, self)

    def _endpoint(self) -> str:
        return _safe_endpoint(self._opts.get("endpoint_url")
                              or (self._opts.get("client_kwargs") or {}).get("endpoint_url"))

    def _unavailable(self, e: BaseException, attempts: int, elapsed: float, op: str, target: str) -> str:
        """The message of a StoreUnavailableError: which store and file, for how long, what to do."""
        if target and not target.startswith(self.url) and "://" not in target and not target.endswith(" paths"):
            target = self._full(target)
        where = f" at {self._endpoint()}" if self._protocol in ("s3", "s3a") else ""
        return (f"store {self.url}{where} is unavailable: {op} {target} failed {attempts} time(s) over "
                f"{elapsed:.1f} s with transient errors, last {type(e).__name__}: "
                f"{self._redact(str(e))[:300]}. Gave up after the retry budget of {self.retry.total_s:g} s "
                "(TLCM_STORE_RETRY_TOTAL_S). Nothing unfinished is marked complete; rerun once the store is "
                "reachable and the work resumes where it stopped.")

    # -- identity ------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    __str__ = __repr__

    @property
    def storage_options(self) -> dict:
        """A copy of the fsspec options (contains credentials: never log it)."""
        return dict(self._opts)

    def _redact(self, msg: str) -> str:
        for s in _secret_values(getattr(self, "_opts", {}) or {}):
            msg = msg.replace(s, "***")
        return msg

    def _full(self, fs_path: str) -> str:
        """fsspec path (protocol stripped) -> URL for users (plain path for local stores)."""
        if self.is_local:
            return fs_path
        return self.url + fs_path[len(self._root):]

    # -- access probe --------------------------------------------------------------------------------

    def check_access(self, write: bool = True) -> None:
        """Fail within seconds with a StoreError that names the URL and the likely fix."""
        if self.is_local:
            return self._check_local(write)
        if self._protocol in ("s3", "s3a"):
            return self._check_s3(write)
        return self._check_generic(self.fs, write)

    def _check_local(self, write: bool) -> None:
        if not os.path.isdir(self._root):
            raise StoreError(f"local store {self.url} does not exist (was it removed?); create the folder")
        if not os.access(self._root, os.R_OK | os.X_OK):
            raise StoreError(f"no read permission on local store {self.url}; fix its permissions or pick "
                             "another folder")
        if write:
            probe = os.path.join(self._root, f".tlcm-access-probe-{uuid.uuid4().hex}.tmp")
            try:
                with open(probe, "wb") as f:
                    f.write(b"probe")
                os.remove(probe)
            except OSError as e:
                raise StoreError(f"no write permission on local store {self.url} ({e.strerror}); fix its "
                                 "permissions or pick another folder") from None

    def _check_s3(self, write: bool) -> None:
        endpoint = _safe_endpoint(self._opts.get("endpoint_url")
                                  or (self._opts.get("client_kwargs") or {}).get("endpoint_url"))
        config = dict(self._opts.get("config_kwargs") or {})
        # Short timeouts and no retries: this is a probe, not a transfer.
        # botocore's retries["max_attempts"] counts retries; total_max_attempts=1 means a single try.
        config.update(connect_timeout=2, read_timeout=5,
                      retries={"total_max_attempts": 1, "mode": "standard"})
        opts = {**self._opts, "config_kwargs": config, "skip_instance_cache": True}
        try:
            probe_fs = fsspec.filesystem("s3", **opts)
        except Exception as e:  # noqa: BLE001 - bad options; report without secrets
            raise StoreError(f"cannot configure S3 access for {self.url}: {self._redact(str(e))}") from None
        probe_fs.retries = 1
        bucket = self._root.split("/", 1)[0]
        env_hint = "storage_options['endpoint_url'] or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL"
        cred_hint = ("the credentials (storage_options key/secret or AWS_ACCESS_KEY_ID / "
                     "AWS_SECRET_ACCESS_KEY) and the bucket policy")

        def explain(e: BaseException, action: str) -> StoreError:
            name = type(e).__name__
            text = self._redact(str(e))
            if _is_connection_error(e):
                return StoreError(f"cannot reach (or no answer from) the S3 endpoint {endpoint} for store "
                                  f"{self.url} ({name}): is the server running and the address right? "
                                  f"Check {env_hint}.")
            if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text or "Not Found" in text:
                return StoreError(f"bucket '{bucket}' does not exist at {endpoint} (store {self.url}): "
                                  f"create it (e.g. `aws s3 mb s3://{bucket}`) or fix the URL / {env_hint}.")
            if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
                return StoreError(f"no permission to {action} on store {self.url} at {endpoint}: check "
                                  f"{cred_hint}.")
            return StoreError(f"cannot {action} on store {self.url} at {endpoint} ({name}: {text}).")

        try:
            probe_fs.call_s3("head_bucket", Bucket=bucket)
        except Exception as e:  # noqa: BLE001 - translated into a StoreError with a fix
            raise explain(e, "access the bucket") from None
        try:
            probe_fs.ls(self._root, detail=False)
        except FileNotFoundError:
            pass  # an empty prefix is fine on object storage
        except Exception as e:  # noqa: BLE001
            raise explain(e, "list objects") from None
        if write:
            key = f"{self._root}/.tlcm-access-probe-{uuid.uuid4().hex}.tmp"
            try:
                probe_fs.pipe_file(key, b"probe")
                probe_fs.rm_file(key)
            except Exception as e:  # noqa: BLE001
                raise explain(e, "write and delete objects") from None

    def _check_generic(self, fs, write: bool) -> None:
        try:
            if fs.exists(self._root):
                fs.ls(self._root, detail=False)
            if write:
                key = f"{self._root}/.tlcm-access-probe-{uuid.uuid4().hex}.tmp"
                fs.pipe_file(key, b"probe")
                fs.rm_file(key)
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"cannot {'write to' if write else 'read'} store {self.url} "
                             f"({type(e).__name__}: {self._redact(str(e))}); check the URL, credentials "
                             "and permissions") from None

    # -- artifacts -----------------------------------------------------------------------------------

    def artifact(self, stage: str, fingerprint: str) -> Artifact:
        return Artifact(self, _check_name("stage", stage), _check_name("fingerprint", fingerprint))

    def open_uri(self, uri: str) -> Artifact:
        """The artifact at a full URI (as in ``Artifact.uri`` / ``Manifest.inputs``) inside this store."""
        if not isinstance(uri, str) or not uri:
            raise StoreError(f"expected an artifact URI, got {uri!r}")
        raw = uri.rstrip("/")
        if self.is_local and raw.startswith("file://"):
            raw = raw[len("file://"):]
        if ".." in raw.replace("\\", "/").split("/"):
            raise UnsafePathError(f"artifact URI {uri} must not contain '..'")
        if self.is_local:
            raw = os.path.abspath(raw)
        prefix = self.url.rstrip("/") + "/"
        if not raw.startswith(prefix):
            raise StoreError(f"artifact URI {uri} is not inside store {self.url}; open it with a store "
                             "rooted at its own location")
        parts = [p for p in raw[len(prefix):].split("/") if p]
        if len(parts) != 2:
            raise StoreError(f"artifact URI {uri} must have the form {self.url}/<stage>/<fingerprint>")
        return self.artifact(parts[0], parts[1])

    def list(self) -> list[Manifest]:
        """Manifests of complete artifacts (manifest present, parseable and not foreign), oldest first."""
        manifests: list[Manifest] = []
        candidates: list[tuple[str, str, str]] = []
        for stage_dir in self._ls_dirs(self._root):
            stage = stage_dir.rsplit("/", 1)[-1]
            if not _NAME_RE.match(stage):
                continue
            for fp_dir in self._ls_dirs(stage_dir):
                fp = fp_dir.rsplit("/", 1)[-1]
                if _NAME_RE.match(fp):
                    candidates.append((stage, fp, f"{fp_dir}/{MANIFEST_NAME}"))
        if not candidates:
            return manifests
        blobs = self.fs.cat([c[2] for c in candidates], on_error="return")
        if not isinstance(blobs, dict):
            blobs = {candidates[0][2]: blobs}
        for stage, fp, path in candidates:
            data = blobs.get(path)
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):  # e.g. a transient error: fetch it again, with retries
                try:
                    data = self.fs.cat_file(path)
                except FileNotFoundError:
                    continue
            if data is None:
                continue
            try:
                m = Manifest.model_validate_json(data)
            except (pydantic.ValidationError, ValueError):
                continue
            if m.stage == stage and m.fingerprint == fp:
                manifests.append(m)
        manifests.sort(key=lambda m: m.created)
        return manifests

    def _ls_dirs(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            if e.get("type") == "directory":
                name = e["name"].rstrip("/")
                if name != path.rstrip("/"):
                    out.append(name)
        return sorted(out)


def _is_connection_error(e: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        BotoConnectionError = HTTPClientError = ()  # type: ignore[assignment]
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
            return True
        if type(e).__name__ in ("ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError"):
            return True
        e = e.__cause__ or e.__context__
    return False


# ----------------------------------------------------------------------------------------------------
# Artifact


class Artifact:
    """One artifact folder. Files, zarr arrays and shard markers go in; :meth:`commit` seals it."""

    def __init__(self, store: ArtifactStore, stage: str, fingerprint: str):
        self.store = store
        self.stage = stage
        self.fingerprint = fingerprint
        self._root = f"{store._root.rstrip('/')}/{stage}/{fingerprint}"
        self.uri = store._full(self._root)

    def __repr__(self) -> str:
        return f"Artifact({self.uri!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Artifact) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def fs(self):
        return self.store.fs

    def _p(self, rel: str) -> str:
        return f"{self._root}/{_clean_rel(rel)}"

    def path(self, rel: str) -> str:
        """Full fsspec path/URL of a file inside the artifact (a plain path for local stores)."""
        return self.store._full(self._p(rel))

    def _writable(self, rel: str) -> str:
        rel = _clean_rel(rel)
        if rel == MANIFEST_NAME:
            raise UnsafePathError(f"{MANIFEST_NAME} is written only by commit() (artifact {self.uri})")
        return rel

    # -- completeness --------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the manifest file exists (one cheap request; no verification)."""
        return self.fs.exists(f"{self._root}/{MANIFEST_NAME}")

    def manifest(self, verify: Literal["none", "size", "checksum"] = "size") -> Manifest:
        if verify not in ("none", "size", "checksum"):
            raise ValueError(f"verify must be 'none', 'size' or 'checksum', got {verify!r}")
        mpath = f"{self._root}/{MANIFEST_NAME}"
        try:
            raw = self.fs.cat_file(mpath)
        except FileNotFoundError:
            raise IncompleteArtifactError(
                f"artifact {self.uri} is incomplete: no {MANIFEST_NAME} (never committed, or still being "
                "computed); run its stage to produce it"
            ) from None
        try:
            m = Manifest.model_validate_json(raw)
        except (pydantic.ValidationError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CorruptArtifactError(
                f"artifact {self.uri}: {MANIFEST_NAME} is unreadable ({first}); delete the artifact folder "
                "and recompute it"
            ) from None
        if m.stage != self.stage or m.fingerprint != self.fingerprint:
            raise CorruptArtifactError(
                f"artifact {self.uri}: {MANIFEST_NAME} belongs to {m.stage}/{m.fingerprint}, not "
                f"{self.stage}/{self.fingerprint} (foreign manifest); delete the artifact folder and "
                "recompute it"
            )
        for rel in m.files:
            try:
                if _clean_rel(rel) != rel or _is_excluded(rel):
                    raise UnsafePathError(rel)
            except UnsafePathError:
                raise CorruptArtifactError(
                    f"artifact {self.uri}: {MANIFEST_NAME} lists an invalid file path {rel!r}") from None
        if verify == "none":
            return m
        present = self._list_files()
        for rel, entry in m.files.items():
            size = present.get(rel)
            if size is None:
                raise CorruptArtifactError(
                    f"artifact {self.uri}: file {rel} listed in the manifest is missing")
            if size != entry.size:
                raise CorruptArtifactError(
                    f"artifact {self.uri}: file {rel} has {size} bytes, the manifest says {entry.size} "
                    "(truncated or overwritten)")
        if verify == "checksum":
            digests = self._hash_files({rel: e.size for rel, e in m.files.items()})
            for rel, entry in m.files.items():
                if digests[rel] != entry.sha256:
                    raise CorruptArtifactError(
                        f"artifact {self.uri}: file {rel} fails its sha256 check "
                        "(content changed after commit)")
        return m

    def is_complete(self, verify: Literal["none", "size", "checksum"] = "size") -> bool:
        """True only if :meth:`manifest` succeeds. An unreachable store still raises (it is not 'missing')."""
        try:
            self.manifest(verify)
        except (IncompleteArtifactError, CorruptArtifactError):
            return False
        return True

    def _list_files(self) -> dict[str, int]:
        """Relative path -> size of every file under the artifact folder."""
        try:
            found = self.fs.find(self._root, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        prefix = self._root + "/"
        out = {}
        for path, info in found.items():
            if info.get("islink") and path.startswith(prefix):  # a link could make us read/hash a file elsewhere
                raise CorruptArtifactError(
                    f"artifact {self.uri}: file {path[len(prefix):]} is a symbolic link (to "
                    f"{info.get('destination', '?')}); artifacts hold plain files only")
            if info.get("type", "file") != "file" or not path.startswith(prefix):
                continue
            out[path[len(prefix):]] = int(info["size"])
        return out

    def _hash_files(self, sizes: dict[str, int]) -> dict[str, str]:
        """sha256 of each file; large files streamed, small remote files fetched concurrently in batches."""
        digests: dict[str, str] = {}
        small = sorted(r for r, s in sizes.items() if s <= _SMALL_FILE)
        def hash_large(rel: str) -> str:
            h = hashlib.sha256()
            with self.fs.open(f"{self._root}/{rel}", "rb", block_size=_HASH_BLOCK) as f:
                while block := f.read(_HASH_BLOCK):
                    h.update(block)
            return h.hexdigest()

        for rel in sorted(set(sizes) - set(small)):
            if self.store.is_local:
                digests[rel] = hash_large(rel)
            else:
                digests[rel] = _retry_call(
                    self.store.retry, lambda rel=rel: hash_large(rel),
                    lambda e, n, t, rel=rel: self.store._unavailable(e, n, t, "read", self.path(rel)),
                    f"{self.uri}: hash {rel}")
        batch: list[str] = []
        batch_bytes = 0

        def flush() -> None:
            if not batch:
                return
            paths = [f"{self._root}/{r}" for r in batch]
            if self.store.is_local:
                blobs = {p: self.fs.cat_file(p) for p in paths}
            else:
                blobs = self.fs.cat(paths, on_error="raise")
                if not isinstance(blobs, dict):
                    blobs = {paths[0]: blobs}
            for r, p in zip(batch, paths):
                digests[r] = hashlib.sha256(blobs[p]).hexdigest()
            batch.clear()

        for rel in small:
            batch.append(rel)
            batch_bytes += sizes[rel]
            if batch_bytes >= _BATCH_BYTES or len(batch) >= 1000:
                flush()
                batch_bytes = 0
        flush()
        return digests

    # -- files ---------------------------------------------------------------------------------------

    def _put(self, rel: str, data: bytes) -> None:
        path = f"{self._root}/{rel}"
        if self.store.is_local:
            # Atomic on a local disk: temp file in the same folder, then rename over the target.
            folder, base = os.path.split(path)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        else:
            self.fs.pipe_file(path, bytes(data))  # one PUT: atomic on object storage

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._put(self._writable(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def exists_file(self, rel: str) -> bool:
        return self.fs.exists(self._p(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode("utf-8"))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def save_tensors(self, rel: str, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save

        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        self.write_bytes(rel, _canonical_safetensors(save(cpu, metadata=metadata)))

    def load_tensors(self, rel: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load, load_file

        if self.store.is_local:
            return load_file(self._p(rel), device=str(device))
        tensors = load(self.read_bytes(rel))
        return {k: v.to(device) for k, v in tensors.items()} if str(device) != "cpu" else tensors

    def tensors_metadata(self, rel: str) -> dict[str, str]:
        """The safetensors ``__metadata__`` dict, read from the header only (two small range reads)."""
        path = self._p(rel)
        head = self.fs.cat_file(path, start=0, end=8)
        if len(head) < 8:
            raise CorruptArtifactError(f"artifact {self.uri}: file {rel} is not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise CorruptArtifactError(
                f"artifact {self.uri}: file {rel} has an implausible safetensors header")
        try:
            header = json.loads(self.fs.cat_file(path, start=8, end=8 + n))
        except ValueError:
            raise CorruptArtifactError(
                f"artifact {self.uri}: file {rel} has an unreadable safetensors header") from None
        return dict(header.get("__metadata__") or {})

    @contextlib.contextmanager
    def local_copy(self, rel: str) -> Iterator[str]:
        """A local filesystem path to the file: the file itself for local stores, else a temp download."""
        path = self._p(rel)
        if self.store.is_local:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{rel} not found in artifact {self.uri}")
            yield path
            return
        tmpdir = tempfile.mkdtemp(prefix="tlcm-")
        try:
            local = os.path.join(tmpdir, posixpath.basename(path))
            self.fs.get_file(path, local)
            yield local
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def upload_dir(self, local_dir: str | os.PathLike, rel: str) -> None:
        """Copy a local folder (e.g. a diffusers model folder) to ``rel`` inside the artifact."""
        rel = self._writable(rel)
        local_dir = os.fspath(local_dir)
        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"{local_dir} is not a folder")
        for dirpath, _, filenames in os.walk(local_dir):
            for name in filenames:
                src = os.path.join(dirpath, name)
                sub = os.path.relpath(src, local_dir).replace(os.sep, "/")
                dst = f"{self._root}/{_clean_rel(rel + '/' + sub)}"
                if self.store.is_local:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(src, dst)
                else:
                    self.fs.put_file(src, dst)

    def download_dir(self, rel: str, local_dir: str | os.PathLike) -> None:
        """Copy the folder ``rel`` inside the artifact to a local folder (created if missing)."""
        src_root = self._p(rel)
        local_dir = os.fspath(local_dir)
        files = self.fs.find(src_root, withdirs=False)
        if not files:
            raise FileNotFoundError(f"no files under {rel} in artifact {self.uri}")
        for src in files:
            sub = _clean_rel(src[len(src_root) + 1:])
            dst = os.path.join(local_dir, *sub.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            self.fs.get_file(src, dst)

    # -- zarr ----------------------------------------------------------------------------------------

    def _zarr_store(self, rel: str, read_only: bool):
        if self.store.is_local:
            return zarr.storage.LocalStore(self._p(rel), read_only=read_only)
        inner = zarr.storage.FsspecStore.from_url(
            self.path(rel), storage_options=self.store._opts, read_only=read_only)
        return _RetryingZarrStore(inner, self.store, self.path(rel))

    def create_array(self, rel: str, shape, chunks, dtype, fill_value=0,
                     overwrite: bool = False) -> zarr.Array:
        """Create a zarr v3 array, or reopen it for writing if it already exists with the same metadata.

        Reopening is what makes shard work resumable; a mismatch (shape, chunks, dtype, fill value) raises
        CorruptArtifactError unless ``overwrite`` (which deletes the existing data).
        """
        rel = self._writable(rel)
        shape = tuple(int(s) for s in shape)
        chunks = tuple(int(c) for c in chunks)
        np_dtype = _numpy_dtype(dtype)
        if len(shape) != len(chunks) or any(c <= 0 for c in chunks) or any(s < 0 for s in shape):
            raise ValueError(f"{rel}: chunks {chunks} must be positive and match the rank of shape {shape}")
        if not overwrite and self.exists_file(f"{rel}/zarr.json"):
            return self._reopen_matching(rel, shape, chunks, np_dtype, fill_value)
        try:
            return zarr.create_array(
                store=self._zarr_store(rel, read_only=False), shape=shape, chunks=chunks, dtype=np_dtype,
                fill_value=fill_value, compressors=None, overwrite=overwrite, zarr_format=3,
            )
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
            # Another worker created it between our check and our create.
            return self._reopen_matching(rel, shape, chunks, np_dtype, fill_value)

    def _reopen_matching(self, rel, shape, chunks, np_dtype, fill_value) -> zarr.Array:
        try:
            arr = zarr.open_array(self._zarr_store(rel, read_only=False), mode="r+", zarr_format=3)
        except (zarr.errors.BaseZarrError, ValueError, KeyError) as e:
            raise CorruptArtifactError(
                f"artifact {self.uri}: file {rel}/zarr.json is not a readable zarr v3 array ({e}); pass "
                "overwrite=True to replace it") from None
        have = (arr.shape, arr.chunks, arr.dtype)
        want = (shape, chunks, np_dtype)
        if have != want or not _same_fill(arr.fill_value, fill_value):
            raise CorruptArtifactError(
                f"artifact {self.uri}: array {rel}/zarr.json exists with shape/chunks/dtype/fill "
                f"{arr.shape}/{arr.chunks}/{arr.dtype}/{arr.fill_value}, requested "
                f"{shape}/{chunks}/{np_dtype}/{fill_value}; a config change should give a new fingerprint "
                "(or pass overwrite=True)")
        return arr

    def open_array(self, rel: str, mode: str = "r") -> zarr.Array:
        rel = _clean_rel(rel)
        if mode in ("r", "r+") and not self.exists_file(f"{rel}/zarr.json"):
            raise FileNotFoundError(f"no zarr array {rel} in artifact {self.uri}")
        if mode != "r":
            self._writable(rel)
        return zarr.open_array(self._zarr_store(rel, read_only=(mode == "r")), mode=mode, zarr_format=3)

    # -- shard done-markers --------------------------------------------------------------------------

    def mark_done(self, name: str, info: dict | None = None) -> None:
        name = _check_name("marker", name)
        body = {"name": name, "info": info or {}, "time": datetime.now(timezone.utc).isoformat()}
        self._put(f"{MARKERS_DIR}/{name}.json",
                  json.dumps(body, sort_keys=True, allow_nan=False).encode("utf-8"))

    def is_done(self, name: str) -> bool:
        return self.fs.exists(f"{self._root}/{MARKERS_DIR}/{_check_name('marker', name)}.json")

    def done_markers(self) -> set[str]:
        try:
            names = self.fs.ls(f"{self._root}/{MARKERS_DIR}", detail=False)
        except FileNotFoundError:
            return set()
        out = set()
        for p in names:
            base = p.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(".json") and not base.startswith("."):
                out.add(base[: -len(".json")])
        return out

    # -- commit --------------------------------------------------------------------------------------

    def commit(self, *, version: int, config: dict, inputs: dict[str, str],
               summary: dict | None = None) -> Manifest:
        """Hash every file (bookkeeping excluded) and write ``manifest.json`` last, atomically."""
        if self.exists():
            raise StoreError(f"artifact {self.uri} is already committed; use it as is (it is a cache hit)")
        files = {rel: size for rel, size in self._list_files().items() if not _is_excluded(rel)}
        digests = self._hash_files(files)
        manifest = Manifest(
            stage=self.stage, fingerprint=self.fingerprint, version=version, config=config,
            inputs=dict(inputs), code_version=code_version(),
            files={rel: FileEntry(size=files[rel], sha256=digests[rel]) for rel in sorted(files)},
            summary=summary or {},
        )
        # Fail before writing if the manifest would not read back (e.g. a non-JSON value in config).
        data = manifest.model_dump_json(indent=2).encode("utf-8")
        Manifest.model_validate_json(data)
        self._put(MANIFEST_NAME, data)
        return manifest

    def clear_partial(self) -> None:
        """Delete everything under the artifact folder; refused once the artifact is committed."""
        if self.exists():
            raise StoreError(f"refusing to clear artifact {self.uri}: it is committed (has {MANIFEST_NAME})")
        if self.store.is_local:
            if os.path.isdir(self._root):
                shutil.rmtree(self._root)
            return
        try:
            self.fs.rm(self._root, recursive=True)
        except FileNotFoundError:
            pass

    def discard(self) -> None:
        """Un-commit and delete the artifact (an explicit `--force`): the manifest goes first, so a crash midway
        leaves a partial artifact, never a complete-looking one."""
        mpath = f"{self._root}/{MANIFEST_NAME}"
        if self.fs.exists(mpath):
            self.fs.rm(mpath)
        if self.fs.exists(self._root):
            self.fs.rm(self._root, recursive=True)
