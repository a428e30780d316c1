"""Storage: local paths and s3:// URIs through fsspec, atomic part commits, manifests.

Object stores: a part is committed in one request (`pipe_file`: one PUT, or one multipart upload
above 100 MB; either way the object appears whole or not at all). Directory listings are never
cached, because parts are written by other processes (Ray workers) and a cached listing in this
one would hide them. Credentials come from the standard AWS chain (environment, ~/.aws files,
instance roles) inside botocore and never pass through this module: no message, log line or
manifest can hold them.
"""
from __future__ import annotations

import contextlib
import io
import os
import uuid
from typing import Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from vecgraph.sharding import schema
from vecgraph.sharding.errors import InputError

_FS_CACHE: dict[tuple[str, str | None], Any] = {}


def s3_endpoint() -> str | None:
    """The endpoint override of an S3-compatible store: VECGRAPH_S3_ENDPOINT, else AWS_ENDPOINT_URL."""
    return os.environ.get("VECGRAPH_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a local path or a URI such as s3://bucket/key.

    s3:// uses the standard AWS environment and config files; AWS_ENDPOINT_URL (or
    VECGRAPH_S3_ENDPOINT) points it at an S3-compatible store.
    """
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    endpoint = s3_endpoint() if protocol in ("s3", "s3a") else None
    key = (protocol, endpoint)
    if key not in _FS_CACHE:
        kwargs: dict[str, Any] = {}
        if protocol in ("s3", "s3a"):
            kwargs["use_listings_cache"] = False   # see the module docstring
            if endpoint:
                kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        _FS_CACHE[key] = fsspec.filesystem(protocol, **kwargs)
    fs = _FS_CACHE[key]
    path = fs._strip_protocol(uri) if protocol != "file" else \
        os.path.abspath(uri.removeprefix("file://"))
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names])


def _forget(fs: Any, path: str) -> None:
    """Drop any cached listing of path and its parents (a no-op where nothing is cached)."""
    invalidate = getattr(fs, "invalidate_cache", None)
    if invalidate is not None:
        invalidate(path)


@contextlib.contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    """A missing object/bucket or a refused request becomes an InputError naming the URI (exit 2).

    Only the store's own reason is kept (s3fs's translation of the S3 error code), never the
    request, so the message cannot carry a credential."""
    try:
        yield
    except FileNotFoundError as e:
        where = "the bucket or key does not exist" if not is_local(uri) else "no such file"
        raise InputError(f"{uri}: cannot {action}: {where} ({_reason(e)}); check the path "
                         f"(`input`, `out`) and, for s3://, that the bucket exists") from None
    except PermissionError as e:
        raise InputError(f"{uri}: cannot {action}: access denied ({_reason(e)}); check the "
                         f"credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                         f"~/.aws) and the bucket policy") from None


def _reason(e: OSError) -> str:
    return str(e.strerror or (e.args[0] if e.args else type(e).__name__))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    _forget(fs, path)
    with _errors(uri, "look up"):
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
        with _errors(uri, "write"):
            fs.pipe_file(path, data)
        _forget(fs, path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with _errors(uri, "read"):
        return bytes(fs.cat_file(path))


def read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of an object (fewer when it is shorter): one ranged GET on S3."""
    return read_ranges(uri, [start], [end])[0]


def read_ranges(uri: str, starts: list[int], ends: list[int]) -> list[bytes]:
    """Bytes [starts[i], ends[i]) of one object, exactly those ranges (concurrent GETs on S3)."""
    fs, path = filesystem(uri)
    with _errors(uri, "read"):
        if len(starts) == 1:
            return [bytes(fs.cat_file(path, start=starts[0], end=ends[0]))]
        return [bytes(b) for b in fs.cat_ranges([path] * len(starts), starts, ends,
                                                on_error="raise")]


def size(uri: str) -> int:
    fs, path = filesystem(uri)
    with _errors(uri, "read the size of"):
        return int(fs.size(path))


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    _forget(fs, path)
    with _errors(uri, "remove"):
        if fs.exists(path):
            fs.rm(path, recursive=True)
    _forget(fs, path)


def remove_temporaries(uri: str) -> None:
    """Delete leftover `*.tmp` files of an interrupted run in a stage folder."""
    fs, path = filesystem(uri)
    _forget(fs, path)
    with _errors(uri, "clean up"):
        if fs.exists(path):
            for p in fs.ls(path, detail=False):
                if str(p).endswith(".tmp"):
                    fs.rm(p)
    _forget(fs, path)


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
    with _errors(uri, "read"):
        return pq.read_table(path, columns=columns, filesystem=fs)


def read_schema(uri: str) -> pa.Schema:
    fs, path = filesystem(uri)
    with _errors(uri, "read"), fs.open(path, "rb") as f:
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
