"""Content-addressed blob store: files named by their sha256, written atomically, verified on read."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from services.common.errors import DataLoss

READ_CHUNK_BYTES = 1024 * 1024
SPOOL_BYTES = 1024 * 1024
"""A blob being received stays in memory up to this size."""


class BlobWriter:
    """Streams one blob in: kept in memory while small, spilled to a temporary file once it grows;
    `commit()` makes it durable under its hash (the event loop never waits on the disk for small
    files, and content that is already stored is not written again)."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._buffer: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._buffer is not None:
            self._buffer += data
            if len(self._buffer) > SPOOL_BYTES:
                self._spill()
        else:
            assert self._file is not None
            self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def _spill(self) -> None:
        handle, name = tempfile.mkstemp(dir=self._store.temporary, prefix="upload-")
        self._file, self._path = os.fdopen(handle, "wb"), Path(name)
        if self._buffer:
            self._file.write(self._buffer)
        self._buffer = None

    def commit(self) -> str:
        """Make the blob durable under its sha256 and return the hex digest."""
        digest = self._hash.hexdigest()
        target = self._store.path_of(digest)
        self._store.pin(digest)
        if target.exists():
            self.discard()
            os.utime(target)  # a fresh mtime keeps the sweep's grace period from taking it
            return digest
        if self._file is None:
            self._spill()
        assert self._file is not None and self._path is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path, target)
        return digest

    def discard(self) -> None:
        """Throw the partial blob away (failed or cancelled upload)."""
        self._buffer = None
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)


class BlobStore:
    """Blobs under `root/sha256/<aa>/<bb>/<digest>`; partial uploads live in `root/tmp`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.temporary = root / "tmp"
        self.temporary.mkdir(parents=True, exist_ok=True)
        self._pins: Counter[str] = Counter()
        self._pins_lock = threading.Lock()

    def path_of(self, digest: str) -> Path:
        return self.root / "sha256" / digest[:2] / digest[2:4] / digest

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def exists(self, digest: str) -> bool:
        return self.path_of(digest).exists()

    def read(self, digest: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        """Yield the blob's content; raises DataLoss at the end if the content was altered."""
        path = self.path_of(digest)
        if not path.exists():
            raise DataLoss(f"blob {digest} is missing from the store", reason="BLOB_MISSING")
        check = hashlib.sha256()
        with path.open("rb") as source:
            while chunk := source.read(chunk_bytes):
                check.update(chunk)
                yield chunk
        if check.hexdigest() != digest:
            raise DataLoss(f"blob {digest} is corrupt: its content no longer matches its hash")

    def pin(self, digest: str) -> None:
        """Protect a blob that an upload in progress will reference from `delete`."""
        with self._pins_lock:
            self._pins[digest] += 1

    def unpin(self, digests: Iterable[str]) -> None:
        with self._pins_lock:
            for digest in digests:
                self._pins[digest] -= 1
                if self._pins[digest] <= 0:
                    del self._pins[digest]

    def delete(self, digests: Iterable[str]) -> None:
        """Delete blobs, except those pinned by an upload in progress in this process."""
        with self._pins_lock:
            for digest in digests:
                if digest not in self._pins:
                    self.path_of(digest).unlink(missing_ok=True)

    def sweep(self, referenced: set[str], older_than_seconds: float = 3600) -> int:
        """Remove abandoned partial uploads and unreferenced blobs older than the grace period.

        The grace period protects blobs written by an upload that has not committed its row yet.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        candidates = [*self.temporary.iterdir()]
        candidates += [path for path in (self.root / "sha256").glob("*/*/*") if path.name not in referenced]
        for path in candidates:
            try:  # an upload may finish (rename) or a delete may run while this looks
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
