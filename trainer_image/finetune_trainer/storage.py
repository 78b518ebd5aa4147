"""Object storage behind one small interface: `s3://` (any S3-compatible endpoint, through boto3)
and `file://` (a mounted volume, and the local run's default).

Writes of a single object are atomic on both: S3 makes an object visible only when its upload
completes, and the file store writes to a temporary name and renames. The checkpoint store builds
its commit protocol on exactly that guarantee.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from finetune_operator import contract

from finetune_trainer.failures import Refused, Transient


class StorageUnavailable(Transient):
    """Storage could not be reached or failed the request; the trainer exits 75 (transient) on it."""

    prefix = "storage unavailable: "


class StorageRefused(Refused):
    """Storage answered, and the answer does not change on a retry: the credentials are wrong or may
    not do this, or the bucket does not exist. The trainer exits 77 and the job fails, naming the fix."""

    prefix = "storage refused: "


# S3 error codes a retry cannot change, with what to fix. The credentials ones name the Secret's
# field only, never a key: `_call` never puts the request (signed with the key) into a message.
_CREDENTIALS_FIX = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the Secret named by "
    "spec.checkpoint.credentialsSecret, and that they may read and write this bucket"
)
REFUSALS = {
    "AccessDenied": _CREDENTIALS_FIX,
    "403": _CREDENTIALS_FIX,  # a HEAD request's refusal has no body, only its status
    "InvalidAccessKeyId": _CREDENTIALS_FIX,
    "SignatureDoesNotMatch": _CREDENTIALS_FIX,
    "NoSuchBucket": "the bucket does not exist at this endpoint: create it, or fix the uri "
    "(or spec.checkpoint.endpointUrl)",
}


class ObjectNotFound(Exception):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root
    size: int


class ObjectStore(Protocol):
    uri: str

    def put_file(self, local: Path, key: str) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, local: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def list(self, prefix: str) -> list[ObjectInfo]: ...
    def delete(self, keys: list[str]) -> None: ...


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"file://{root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def _atomic_write(self, key: str, write: Any) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, local: Path, key: str) -> None:
        with local.open("rb") as src:
            self._atomic_write(key, lambda out: shutil.copyfileobj(src, out, 8 << 20))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda out: out.write(data))

    def get_file(self, key: str, local: Path) -> None:
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._path(key), local)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self._path(prefix)
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        out = []
        for path in _walk(start):
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix) and not path.name.endswith(".partial"):
                out.append(ObjectInfo(key=key, size=path.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


def _walk(start: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(start):
        for name in names:
            yield Path(dirpath) / name


class S3Store:
    """S3 through boto3. Credentials, endpoint and region come from the environment (the pod gets them
    from the user's Secret); they are never logged or put into an exception message."""

    def __init__(self, bucket: str, prefix: str, client: Any, transfer_config: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client
        self._transfer = transfer_config

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            try:
                return fn(*args, **kwargs)
            except S3UploadFailedError as exc:
                # boto3's transfer wraps the service's answer (raised inside its `except ClientError`).
                if isinstance(exc.__context__, ClientError):
                    raise exc.__context__ from None
                raise StorageUnavailable(f"{what} on {self.uri} failed: upload failed") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise ObjectNotFound(what) from None
            if code in REFUSALS:
                raise StorageRefused(f"{what} on {self.uri}: {code}; {REFUSALS[code]}") from None
            raise StorageUnavailable(f"{what} on {self.uri} failed: {code or 'error'}") from None
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(f"{what} on {self.uri} failed: {type(exc).__name__}") from None

    def put_file(self, local: Path, key: str) -> None:
        self._call(
            f"upload {key}",
            self._client.upload_file,
            str(local),
            self.bucket,
            self._key(key),
            Config=self._transfer,
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".partial")
        self._call(
            f"download {key}",
            self._client.download_file,
            self.bucket,
            self._key(key),
            str(tmp),
            Config=self._transfer,
        )
        os.replace(tmp, local)

    def get_bytes(self, key: str) -> bytes:
        response = self._call(f"get {key}", self._client.get_object, Bucket=self.bucket, Key=self._key(key))
        data: bytes = response["Body"].read()
        return data

    def list(self, prefix: str) -> list[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        out = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._call(
            f"list {prefix}", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)))
        )
        for page in pages:
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(key=obj["Key"][strip:], size=obj["Size"]))
        return sorted(out, key=lambda o: o.key)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._call(
                "delete",
                self._client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )


def s3_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        # Exponential backoff with jitter on throttling and dropped connections; AWS_MAX_ATTEMPTS,
        # the standard variable, still wins.
        retries={"max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "8")), "mode": "adaptive"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get(contract.ENV_S3_ENDPOINT),
        region_name=region or os.environ.get(contract.ENV_S3_REGION),
        config=config,
    )


def transfer_config(concurrency: int = 16, chunk_mib: int = 16) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=chunk_mib << 20,
        multipart_chunksize=chunk_mib << 20,
        max_concurrency=concurrency,
        use_threads=True,
    )


def _open_file(parsed: Any, endpoint_url: str | None, region: str | None) -> ObjectStore:
    return FileStore(Path(parsed.path))


def _open_s3(parsed: Any, endpoint_url: str | None, region: str | None) -> ObjectStore:
    return S3Store(parsed.netloc, parsed.path, s3_client(endpoint_url, region), transfer_config())


# The only place that dispatches on a storage scheme; the schemes are the API's (STORAGE_SCHEMES).
OPENERS = {"file": _open_file, "s3": _open_s3}


def is_storage_uri(uri: str) -> bool:
    """Whether `uri` names a store location (anything else a model source may be is a hub id)."""
    return urlparse(uri).scheme in OPENERS


def local_path(uri: str) -> Path | None:
    """The directory a store location already is on this machine (file://), or None."""
    parsed = urlparse(uri)
    return Path(parsed.path) if parsed.scheme == "file" else None


Opener = Callable[[str], ObjectStore]


def opener(endpoint_url: str | None, region: str | None) -> Opener:
    """How the trainer opens every store it touches (model, data, checkpoints, output, a warm
    start's checkpoint): the job's endpoint and region reach each of them by this one route."""
    return functools.partial(open_store, endpoint_url=endpoint_url, region=region)


def open_store(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> ObjectStore:
    parsed = urlparse(uri)
    opener = OPENERS.get(parsed.scheme)
    if opener is None:
        schemes = " or ".join(f"{s}://" for s in OPENERS)
        raise ValueError(f"unsupported storage uri scheme {parsed.scheme!r}: use {schemes}")
    return opener(parsed, endpoint_url, region)
