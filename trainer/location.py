"""Where a run's files live: a local path, or a URI of an object store (``s3://``, ``gs://``,
``abfss://``, ...), reached through one seam: pyarrow's filesystems, the ones Ray Train uploads
checkpoints with (``pyarrow.fs.FileSystem.from_uri``).

Credentials and the endpoint come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ..., ``GOOGLE_APPLICATION_CREDENTIALS``), which pyarrow reads on each
process; nothing here writes them anywhere, and no filesystem object (which holds them) is
handed to Ray.

A remote run directory has a node-local mirror in the user cache (``staging``): the files the
driver and rank 0 write with plain file I/O (summary, metrics, TensorBoard events) go there and
are uploaded (``upload``); what is read as a whole (a run to resume, export or report, a
checkpoint to restore) is downloaded there first. The mapping is one-to-one both ways
(``staging``, ``uri_of``), so a staged path says where it belongs.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
from pathlib import Path
from typing import Optional

from trainer import user_cache

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
STAGING = "remote"  # the user cache's folder of remote run directories' mirrors
COPIES = "remote-checkpoints"  # ... of checkpoints on their way to or from a bucket
READ = "remote-read"  # ... and of whole runs, checkpoints included, copied to be read (export, generate)


def is_uri(where: str | Path) -> bool:
    """An object-store URI (``file://`` is a plain path and is not one)."""
    m = _URI.match(str(where))
    return bool(m) and m.group(1).lower() != "file"


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for ``uri``."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def staging(uri: str, folder: str = STAGING) -> Path:
    """This node's mirror of ``uri`` in the user cache's ``folder``."""
    scheme, rest = _URI.match(uri).groups()
    return user_cache.root() / folder / scheme.lower() / rest.strip("/")


def uri_of(path: str | Path) -> Optional[str]:
    """The URI whose mirror ``path`` is, or None for a path of its own."""
    try:
        rel = Path(path).resolve().relative_to((user_cache.root() / STAGING).resolve())
    except ValueError:
        return None
    scheme, *rest = rel.parts
    return f"{scheme}://" + "/".join(rest) if rest else None


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def download(uri: str, local: Path, skip: tuple[str, ...] = (), fresh: bool = True) -> Path:
    """Copy the directory ``uri`` into ``local`` (emptied first when ``fresh``), leaving out the
    files named in ``skip`` and those under a folder named there; returns ``local``."""
    import pyarrow.fs

    fs, root = filesystem(uri)
    if fresh:
        shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True, exist_ok=True)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
        rel = info.path[len(root):].lstrip("/")
        if info.type != pyarrow.fs.FileType.File or set(Path(rel).parts) & set(skip):
            continue
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(local / rel, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return local


def listing(uri: str) -> dict[str, list]:
    """Every file under the directory ``uri`` with its size and modification time: what a
    complete, current copy must hold. The time tells a model re-uploaded with the same shapes
    (so the same sizes) from the copy of the old one."""
    import pyarrow.fs

    fs, root = filesystem(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root):].lstrip("/"): [i.size, i.mtime_ns] for i in infos if i.type == pyarrow.fs.FileType.File}


def fetched(where: str) -> Path:
    """A local directory for ``where``: itself, or (a URI) this node's copy in the user cache,
    fetched once per node: one process fetches while the others on the node wait for it. The
    copy counts when the files' listing (names, sizes and times, written last) matches the
    store's: a fetch cut short, or files replaced in the bucket, is fetched again."""
    if not is_uri(where):
        return Path(where)
    want = listing(where)  # before anything is written here: a URI with nothing behind it leaves no trace
    if not want:
        raise FileNotFoundError(f"{where}: nothing there")
    local = staging(where, READ)
    local.parent.mkdir(parents=True, exist_ok=True)
    done = local.with_name(local.name + ".listing.json")
    with open(local.with_name(local.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            complete = json.loads(done.read_text()) == want
        except (OSError, ValueError):
            complete = False
        if not complete:
            done.unlink(missing_ok=True)
            download(where, local)
            done.write_text(json.dumps(want))
    return local


def upload(local: Path, uri: str, skip: tuple[str, ...] = ()) -> None:
    """Copy the files under ``local`` to ``uri`` (what is there already is replaced), but those
    named in ``skip``."""
    fs, root = filesystem(uri)
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name not in skip):
        with open(path, "rb") as src, fs.open_output_stream(f"{root}/{path.relative_to(local).as_posix()}") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    """One object, whole: S3 and GCS make it visible at once or not at all."""
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def subdirs(uri: str) -> list[str]:
    """Names directly under ``uri`` that hold something ([] when there is nothing there)."""
    import pyarrow.fs

    fs, root = filesystem(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]


def remove(uri: str) -> None:
    """Delete the directory or file ``uri``; nothing there is nothing to do."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    try:
        if kind == pyarrow.fs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pyarrow.fs.FileType.File:
            fs.delete_file(path)
    except FileNotFoundError:
        pass
