"""Streaming Parquet part writer: row groups go to a temporary file, committed atomically.

Locally the temporary file sits beside the part and is renamed over it; for object stores it
is a local temporary file uploaded in one request at the end (S3 multipart uploads also
appear at once). Memory stays at one row group, whatever the part's size.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from vecgraph.sharding import schema, storage


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
        self.writer = pq.ParquetWriter(self.tmp, arrow_schema, compression="zstd")
        self.committed: schema.Part | None = None

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table.cast(self.schema))
        self.rows += table.num_rows

    def commit(self, id_min: int, id_max: int) -> schema.Part:
        self.writer.close()
        digest, size = hashlib.sha256(), 0
        with open(self.tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
        if storage.is_local(self.uri):
            os.replace(self.tmp, storage.filesystem(self.uri)[1])
        else:
            fs, path = storage.filesystem(self.uri)
            fs.put_file(self.tmp, path)
            os.remove(self.tmp)
        self.committed = schema.Part(self.name, self.rows, id_min, id_max, size, digest.hexdigest())
        return self.committed

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed is None:  # failed half-way: leave nothing behind
            self.writer.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
