"""Storage: local paths and s3:// URIs through fsspec, atomic part commits, manifests."""
from __future__ import annotations

import io
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from vecgraph.sharding import schema

_FS_CACHE: dict[str, Any] = {}


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a local path or a URI such as s3://bucket/key.

    s3:// uses the standard AWS environment and config files; AWS_ENDPOINT_URL (or
    VECGRAPH_S3_ENDPOINT) points it at an S3-compatible store.
    """
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol not in _FS_CACHE:
        kwargs: dict[str, Any] = {}
        if protocol == "s3":
            endpoint = os.environ.get("VECGRAPH_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        _FS_CACHE[protocol] = fsspec.filesystem(protocol, **kwargs)
    fs = _FS_CACHE[protocol]
    path = fs._strip_protocol(uri) if protocol != "file" else os.path.abspath(uri)
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def put_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: tmp + rename locally, one PUT request on object stores."""
    fs, path = filesystem(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_temporaries(uri: str) -> None:
    """Delete leftover `*.tmp` files of an interrupted run in a stage folder."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        for p in fs.ls(path, detail=False):
            if str(p).endswith(".tmp"):
                fs.rm(p)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue()


def write_part(stage_uri: str, name: str, table: pa.Table, id_min: int, id_max: int) -> schema.Part:
    """Commit one Parquet part of a stage output; returns its manifest entry."""
    data = parquet_bytes(table)
    put_bytes(join(stage_uri, name), data)
    return schema.Part(path=name, n_rows=table.num_rows, id_min=id_min, id_max=id_max,
                       bytes=len(data), sha256=schema.sha256_bytes(data))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def read_schema(uri: str) -> pa.Schema:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def write_json(uri: str, text: str) -> None:
    put_bytes(uri, text.encode())


def read_manifest(stage_uri: str) -> schema.Manifest | None:
    """The stage's manifest, or None when the output is not committed."""
    uri = join(stage_uri, schema.MANIFEST)
    if not exists(uri):
        return None
    return schema.Manifest.from_json(read_bytes(uri).decode())


def write_manifest(stage_uri: str, manifest: schema.Manifest) -> None:
    write_json(join(stage_uri, schema.MANIFEST), manifest.to_json())
