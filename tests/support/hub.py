"""A model hub on 127.0.0.1 that serves one gated repository, for tests without network.

It answers the Hugging Face hub's file protocol as huggingface_hub's client uses it (HEAD/GET
`/<repo>/resolve/<revision>/<file>` with `X-Repo-Commit` and `ETag`, `X-Error-Code: EntryNotFound`
for a file the repo lacks, 404 for the model-info API) and refuses every request without the right
bearer token the way the real hub refuses a gated repo (401, `X-Error-Code: GatedRepo`). It records
the Authorization header of every request."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class FakeHub:
    repo: str
    files: dict[str, bytes]
    token: str
    url: str = ""
    authorizations: list[str | None] = field(default_factory=list)


def _handler(hub: FakeHub) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _answer(self) -> None:
            hub.authorizations.append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                message = f"Access to model {hub.repo} is restricted. You must be authenticated."
                self._send(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": message}, b"")
                return
            prefix = f"/{hub.repo}/resolve/"
            path = self.path.split("?", 1)[0]
            if not path.startswith(prefix):
                self._send(404, {}, b"")
                return
            name = path[len(prefix) :].split("/", 1)[1]
            data = hub.files.get(name)
            if data is None:
                self._send(404, {"X-Error-Code": "EntryNotFound"}, b"")
                return
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            self._send(200, {"X-Repo-Commit": "0" * 40, "ETag": etag}, data)

        def do_GET(self) -> None:
            self._answer()

        def do_HEAD(self) -> None:
            self._answer()

    return Handler


@contextlib.contextmanager
def fake_hub(repo: str, files: dict[str, bytes], token: str) -> Iterator[FakeHub]:
    hub = FakeHub(repo=repo, files=files, token=token)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
