"""moto's S3 server on 127.0.0.1: the S3 wire protocol, spoken to by boto3 as it would to MinIO."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import boto3

# moto's request recorder (record/recorded below) writes where this says, read when moto loads:
# a temporary file rather than the working directory.
os.environ.setdefault(
    "MOTO_RECORDER_FILEPATH", os.path.join(tempfile.gettempdir(), f"ftjob-moto-recording-{os.getpid()}")
)
from moto.server import ThreadedMotoServer

# Stand-in credentials; the tests also use them to prove secrets never reach logs or errors.
ACCESS_KEY = "AKIAFTJOBTESTKEY0001"
SECRET_KEY = "ftjob-test-secret-0f9c3a7e5b1d"


@dataclass(frozen=True)
class S3Endpoint:
    url: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):  # type: ignore[no-untyped-def]
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def record(self) -> None:
        """Start moto's request recorder afresh (its /moto-api/recorder): the store's request log."""
        for action in ("stop-recording", "reset-recording", "start-recording"):
            request = urllib.request.Request(f"{self.url}/moto-api/recorder/{action}", method="POST")
            urllib.request.urlopen(request).close()

    def recorded(self) -> list[tuple[str, str]]:
        """(method, path) of every request since `record`, oldest first, and the recording stopped.
        The recorder writes one JSON object per request from the server's threads, not always with a
        newline between two."""
        with urllib.request.urlopen(f"{self.url}/moto-api/recorder/download-recording") as response:
            text = response.read().decode()
        # The recorder keeps every request body: stopped here, so later tests on this server do not pay.
        request = urllib.request.Request(f"{self.url}/moto-api/recorder/stop-recording", method="POST")
        urllib.request.urlopen(request).close()
        decoder, at, out = json.JSONDecoder(), 0, []
        while (at := _skip_space(text, at)) < len(text):
            request, at = decoder.raw_decode(text, at)
            out.append((request["method"], urllib.parse.urlparse(request["url"]).path))
        return out

    def new_bucket(self) -> str:
        name = f"ftjob-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at].isspace():
        at += 1
    return at


@contextmanager
def moto_s3() -> Iterator[S3Endpoint]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Endpoint(url=f"http://{host}:{port}")
    finally:
        server.stop()
