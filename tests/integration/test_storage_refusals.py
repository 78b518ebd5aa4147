"""Storage answers that a retry cannot change end the run as StorageRefused (exit 77, the job
fails at once) naming what to fix, not as transient (exit 75, a counted restart that gets the same
answer). moto's S3 server with its request authentication switched on gives the real answers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from finetune_operator import contract
from finetune_trainer.storage import ObjectStore, StorageRefused, open_store

from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Endpoint

SECRET_FIELD = "spec.checkpoint.credentialsSecret"


@dataclass(frozen=True)
class Keys:
    access: str
    secret: str


@pytest.fixture(scope="module")
def iam_user(s3: S3Endpoint) -> Keys:
    """A user with keys and no policy: authenticated, allowed nothing."""
    iam = boto3.client("iam", endpoint_url=s3.url, aws_access_key_id=ACCESS_KEY,
                       aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip
    iam.create_user(UserName="ftjob-no-rights")
    key = iam.create_access_key(UserName="ftjob-no-rights")["AccessKey"]
    return Keys(key["AccessKeyId"], key["SecretAccessKey"])


@pytest.fixture
def authenticating(s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A bucket, then moto checks every request's signature and policy (as AWS and MinIO do)."""
    from moto import settings

    bucket = s3.new_bucket()
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    yield bucket


def _store(s3: S3Endpoint, bucket: str, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys.access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys.secret)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    return open_store(f"s3://{bucket}/runs", endpoint_url=s3.url, region="us-east-1")


def _refusal(store: ObjectStore, operation: str, tmp_path: Path) -> StorageRefused:
    local = tmp_path / "blob"
    local.write_bytes(b"x")
    with pytest.raises(StorageRefused) as raised:
        if operation == "list":
            store.list("checkpoints/")
        elif operation == "upload":
            store.put_file(local, "checkpoints/blob")
        elif operation == "download":
            store.get_file("checkpoints/blob", tmp_path / "downloaded")
        else:
            store.get_bytes("checkpoints/MANIFEST.json")
    return raised.value


@pytest.mark.parametrize("operation", ["list", "upload", "get", "download"])
@pytest.mark.parametrize(
    ("who", "code"),
    [
        ("unknown key", "InvalidAccessKeyId"),
        ("wrong secret", "SignatureDoesNotMatch"),
        ("no rights", "AccessDenied"),
    ],
)
def test_refused_credentials_are_fatal_and_name_the_secret_field(
    who: str, code: str, operation: str, s3: S3Endpoint, iam_user: Keys, authenticating: str,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:  # fmt: skip
    keys = {
        "unknown key": Keys("AKIAFTJOBUNKNOWN0001", "whatever-secret"),
        "wrong secret": Keys(iam_user.access, "not-the-secret-of-this-key"),
        "no rights": iam_user,
    }[who]
    refusal = _refusal(_store(s3, authenticating, keys, monkeypatch), operation, tmp_path)
    assert refusal.exit_code == contract.ExitCode.STORAGE_REFUSED
    message = refusal.reason()
    # A HEAD (download's first request) has no body: its refusal is the bare status.
    assert code in message or (operation == "download" and ": 403;" in message), message
    assert SECRET_FIELD in message and keys.secret not in message and iam_user.secret not in message


@pytest.mark.parametrize("operation", ["list", "upload", "get"])
def test_a_bucket_that_does_not_exist_is_fatal_and_says_so(  # (a download's HEAD says only 404)
    operation: str, s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = _store(s3, "ftjob-no-such-bucket", Keys(ACCESS_KEY, SECRET_KEY), monkeypatch)
    message = _refusal(store, operation, tmp_path).reason()
    assert "NoSuchBucket" in message and "create it" in message and SECRET_KEY not in message
