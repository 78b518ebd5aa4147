"""A directory committed by its manifest: how the trainer stores what a reader must never take
half-written (a checkpoint, the tokenized cache, the exported model).

    <prefix>/<files, at any depth>
    <prefix>/MANIFEST.json   <- written last, in one atomic put: the commit point

Rules, the same for every user:
- The manifest lists every file of the commit: its path relative to the directory, its size and
  sha256. It is written only after every file it lists is uploaded, and a single put is atomic on
  every store (storage.py), so no manifest means no directory, and a manifest means a whole one.
- A writer that replaces files of a committed directory deletes its manifest first (`uncommit`):
  from the first replaced file on, the old manifest would describe files that are no longer its own.
  Whoever deletes a committed directory deletes the manifest first too, so a half-finished clean-up
  leaves an uncommitted directory, never a torn committed one.
- Listing the sizes (`problem`) only picks candidates; a file is trusted once downloaded and its
  size and checksum match its entry (`download`). A missing or mismatching file is `TornDirectory`.
- A downloaded copy also ends with the manifest, so a local copy holding one is complete.

What else a manifest holds (a checkpoint's step and data position, the cache's report, the export's
kind) and how it is serialized belongs to its user: this module moves the manifest's text as given,
so each keeps its own bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from finetune_trainer.storage import ObjectNotFound, ObjectStore

MANIFEST = "MANIFEST.json"
UPLOAD_WORKERS = 8  # files in flight at once; each also uploads its parts concurrently


class FileEntry(BaseModel):
    path: str  # relative to the committed directory
    size: int
    sha256: str


class TornDirectory(Exception):
    """A file a manifest lists is missing, or its bytes are not the ones the manifest recorded."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(path: Path, entry: FileEntry) -> bool:
    try:
        return path.stat().st_size == entry.size and sha256_of(path) == entry.sha256
    except OSError:
        return False


def upload_tree(store: ObjectStore, local_dir: Path, prefix: str) -> list[FileEntry]:
    """Upload every file under `local_dir` to `<prefix>/<relative path>`; their entries, sorted.

    Files upload side by side (each in concurrent parts) while their checksums are computed:
    hashing and the network both release the interpreter lock. Also for what is never committed
    (the data plan, a rank's tokenized share): the entries are then simply dropped."""
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    relative = [p.relative_to(local_dir).as_posix() for p in files]
    with ThreadPoolExecutor(max_workers=max(1, min(UPLOAD_WORKERS, 2 * len(files)))) as pool:
        digests = [pool.submit(sha256_of, path) for path in files]
        uploads = [pool.submit(store.put_file, path, f"{prefix}/{rel}" if prefix else rel)
                   for path, rel in zip(files, relative, strict=True)]  # fmt: skip
        for upload in uploads:
            upload.result()
        return [
            FileEntry(path=rel, size=path.stat().st_size, sha256=digest.result())
            for path, rel, digest in zip(files, relative, digests, strict=True)
        ]


@dataclass(frozen=True)
class CommittedDir:
    store: ObjectStore
    prefix: str  # inside the store; "" is the store's root (the export's output uri)

    def key(self, path: str) -> str:
        """The store key of `path`, relative to the directory ("" gives the listing prefix)."""
        return f"{self.prefix}/{path}" if self.prefix else path

    @property
    def manifest_key(self) -> str:
        return self.key(MANIFEST)

    # -- writing -----------------------------------------------------------------------------

    def uncommit(self) -> None:
        self.store.delete([self.manifest_key])

    def upload(self, local_dir: Path) -> list[FileEntry]:
        return upload_tree(self.store, local_dir, self.prefix)

    def commit(self, manifest: str, local_copy: Path | None = None) -> None:
        """Write the manifest, the last step of a commit; also into `local_copy`, the directory the
        files were uploaded from, when that copy is kept."""
        self.store.put_bytes(self.manifest_key, manifest.encode())
        if local_copy is not None:
            (local_copy / MANIFEST).write_text(manifest)

    # -- reading -----------------------------------------------------------------------------

    def manifest(self) -> bytes:
        """The committed manifest's bytes; ObjectNotFound while the directory is uncommitted."""
        return self.store.get_bytes(self.manifest_key)

    def problem(self, files: list[FileEntry]) -> str | None:
        """What a listing shows wrong with the files (one missing, a size that differs), or None."""
        present = {o.key: o.size for o in self.store.list(self.key(""))}
        for entry in files:
            size = present.get(self.key(entry.path))
            if size is None:
                return f"{entry.path} is missing"
            if size != entry.size:
                return f"{entry.path} has {size} bytes, the manifest says {entry.size}"
        return None

    def download(self, files: list[FileEntry], dest: Path, manifest: str,
                 wanted: Callable[[str], bool] | None = None) -> int:  # fmt: skip
        """Fetch the files (those `wanted`, or all) into `dest` and verify each, then write
        `manifest` there last; the bytes fetched. A file already in `dest` with the manifest's size
        and checksum is kept, not fetched (the node's own copy, for an in-place restart).
        TornDirectory at the first file that fails."""
        fetched = 0
        for entry in files:
            if wanted is not None and not wanted(entry.path):
                continue
            local = dest / entry.path
            if _matches(local, entry):
                continue
            fetched += entry.size
            try:
                self.store.get_file(self.key(entry.path), local)
            except ObjectNotFound:
                raise TornDirectory(f"{entry.path} vanished") from None
            if local.stat().st_size != entry.size or sha256_of(local) != entry.sha256:
                raise TornDirectory(f"{entry.path} does not match its checksum")
        (dest / MANIFEST).write_text(manifest)
        return fetched


def fetch_whole(directory: CommittedDir, local: Path, files_of: Callable[[str], list[FileEntry]]) -> bool:
    """Whether `local` holds a verified copy of the committed directory, downloading it when it does
    not yet (into `<local>.partial`, renamed into place once whole, so a killed download leaves
    nothing reusable); False while the directory is uncommitted or when it is torn. `files_of` reads
    the file list from the manifest's text, whose format is the caller's."""
    if (local / MANIFEST).exists():
        return True
    try:
        text = directory.manifest().decode()
    except ObjectNotFound:
        return False
    partial = local.with_name(local.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        directory.download(files_of(text), partial, text)
    except TornDirectory:
        return False
    shutil.rmtree(local, ignore_errors=True)
    os.replace(partial, local)
    return True
