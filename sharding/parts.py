"""Streaming Parquet part writer: row groups go to a temporary file, committed atomically.

Locally the temporary file sits beside the part and is renamed over it; for object stores it
is a local temporary file uploaded in one request at the end (S3 multipart uploads also
appear at once). Memory stays at one row group, whatever the part's size.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from vecgraph.sharding import schema, storage


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what goes through it (no second read of the part)."""

    def __init__(self, f: io.BufferedWriter):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.digest.update(b)
        self.size += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()
        super().close()


class PartWriter:
    """with PartWriter(stage_uri, name, arrow_schema) as w: w.write(table); ...; w.part(...)"""

    def __init__(self, stage_uri: str, name: str, arrow_schema: pa.Schema):
        self.uri = storage.join(stage_uri, name)
        self.name = name
        self.schema = arrow_schema
        self.rows = 0
        if storage.is_local(self.uri):
            path = storage.filesystem(self.uri)[1]
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        else:
            fd, self.tmp = tempfile.mkstemp(suffix=".parquet.tmp")
            os.close(fd)
        self.file = _HashingFile(open(self.tmp, "wb"))
        self.writer = pq.ParquetWriter(self.file, arrow_schema, compression="zstd")
        self.committed: schema.Part | None = None

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table if table.schema.equals(self.schema) else table.cast(self.schema))
        self.rows += table.num_rows

    def commit(self, id_min: int, id_max: int) -> schema.Part:
        self.writer.close()
        self.file.close()
        if storage.is_local(self.uri):
            os.replace(self.tmp, storage.filesystem(self.uri)[1])
        else:
            fs, path = storage.filesystem(self.uri)
            fs.put_file(self.tmp, path)
            os.remove(self.tmp)
        self.committed = schema.Part(self.name, self.rows, id_min, id_max, self.file.size,
                                     self.file.digest.hexdigest())
        return self.committed

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed is None:  # failed half-way: leave nothing behind
            self.writer.close()
            self.file.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
