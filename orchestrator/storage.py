"""Where a run's results and data live: on a path that every node of the cluster reaches, or
in a bucket (docs/clusters.md, "Results on several nodes" and "Results in a bucket").

Workers read and write the run directory and the dataset with plain file I/O, so on several
nodes each must see the same files at the same path. A bucket's run directory is a node-local
mirror that ``publish`` uploads. The decisions are pure functions (``output_dir_problem``,
``shared_problems``, ``bucket_problem``); the Ray side (``check_nodes``) only gathers what each
node sees.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from orchestrator.errors import UsageError
from trainer import location

log = logging.getLogger(__name__)

MARKER_FILE = ".storage-check"
NODE_CHECK_TIMEOUT_S = 120.0
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Where Ray unpacks a `ray job submit --working-dir` upload; Ray deletes it when it needs the space.
_JOB_WORKING_DIR = "/runtime_resources/working_dir_files/"
# Filesystems that are one machine's own: a multi-node run cannot share them.
LOCAL_FS_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay", "f2fs", "vfat", "apfs"})


def output_dir_problem(output_dir: str, cwd: str) -> Optional[str]:
    """Why ``--output-dir`` cannot hold this run's results (before anything starts), or None."""
    m = _URI.match(output_dir)
    if m and m.group(1).lower() == "file":
        return f"--output-dir {output_dir}: use the plain path {output_dir[len(m.group(0)):]!r}"
    if m:
        return None
    if not PurePosixPath(output_dir).is_absolute() and _JOB_WORKING_DIR in cwd.replace("\\", "/") + "/":
        return (f"--output-dir {output_dir}: a relative path would put results in this job's uploaded "
                f"working directory ({cwd}), which Ray deletes; pass an absolute path, on shared storage "
                "for a multi-node cluster (e.g. --output-dir /mnt/shared/runs)")
    return None


@dataclass(frozen=True)
class DataFingerprint:
    """Enough of a token dataset to tell two copies apart without reading them."""

    num_tokens: int
    vocab_size: int
    nbytes: int


@dataclass(frozen=True)
class NodeView:
    """What one alive node sees of the run's paths; ``answered`` is False when it did not reply."""

    node_id: str
    ip: str
    answered: bool = True
    sees_output: bool = False
    data: Optional[DataFingerprint] = None


def shared_problems(output_dir: str, data_path: str, driver_data: DataFingerprint,
                    nodes: list[NodeView], fs_type: Optional[str] = None) -> list[str]:
    """Why the run's paths are not usable on every node: one message per problem; [] when fine."""
    if len(nodes) <= 1:
        return []
    where = lambda views: ", ".join(f"{v.ip} ({v.node_id[:8]})" for v in views)  # noqa: E731
    problems = []
    silent = [v for v in nodes if not v.answered]
    if silent:
        problems.append(f"node(s) {where(silent)} did not answer the storage check within "
                        f"{NODE_CHECK_TIMEOUT_S:.0f} s; is the cluster healthy?")
    blind = [v for v in nodes if v.answered and not v.sees_output]
    if blind:
        local = f" (it is on {fs_type}, a filesystem local to this machine)" if fs_type in LOCAL_FS_TYPES else ""
        problems.append(
            f"--output-dir {output_dir} is not shared: node(s) {where(blind)} cannot see it{local}. "
            f"A run on {len(nodes)} nodes needs a directory every node reaches at the same path: "
            "an NFS or other shared filesystem mount, or a bucket mounted on every node")
    missing = [v for v in nodes if v.answered and v.data is None]
    if missing:
        problems.append(
            f"data {data_path} is missing on node(s) {where(missing)}: put the dataset on shared storage "
            "(--preprocessed-data), or at the same path on every node")
    differ = [v for v in nodes if v.answered and v.data is not None and v.data != driver_data]
    if differ:
        problems.append(f"data {data_path} on node(s) {where(differ)} differs from the driver's copy "
                        f"({driver_data.num_tokens} tokens, vocab {driver_data.vocab_size}); "
                        "every node must read the same dataset")
    return problems


# ---------------------------------------------------------------- the I/O edges


def fingerprint(data_path: str) -> Optional[DataFingerprint]:
    """The dataset's header facts, or None where it is not there."""
    import json

    from trainer.dataset import META_FILE, TOKENS_FILE

    try:
        meta = json.loads((Path(data_path) / META_FILE).read_text())
        nbytes = (Path(data_path) / TOKENS_FILE).stat().st_size
        return DataFingerprint(int(meta["num_tokens"]), int(meta["vocab_size"]), nbytes)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fs_type(path: Path) -> Optional[str]:
    """The filesystem type of the mount holding ``path``, as this machine sees it."""
    import psutil

    path = path.resolve()
    best: tuple[int, Optional[str]] = (-1, None)
    for part in psutil.disk_partitions(all=True):
        mount = Path(part.mountpoint)
        if (path == mount or mount in path.parents) and len(mount.parts) > best[0]:
            best = (len(mount.parts), part.fstype)
    return best[1]


def _look(marker: str, token: str, data: str) -> tuple[bool, Optional[DataFingerprint]]:
    try:
        sees = Path(marker).read_text() == token
    except OSError:
        sees = False
    try:
        local = location.fetched(data)  # a bucket's dataset: this node fetches its copy now
    except OSError:
        return sees, None
    return sees, fingerprint(str(local))


def check_nodes(run_dir: Path, data_path: str | Path, shared: bool = True) -> None:
    """Raise UsageError unless every alive node sees ``run_dir`` (when it must be ``shared``:
    not a bucket's mirror) and the same dataset.

    A marker file with a random token goes into the run directory; one zero-CPU task per node
    reads it back, so the answer comes from each node itself, whatever its mounts are.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) <= 1:
        return
    token = secrets.token_hex(16)
    marker = run_dir / MARKER_FILE
    marker.write_text(token)
    look = ray.remote(num_cpus=0, max_retries=0)(_look)
    try:
        refs = {n["NodeID"]: look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker), token, str(data_path)) for n in alive}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=NODE_CHECK_TIMEOUT_S)
        views = []
        for n in alive:
            ref = refs[n["NodeID"]]
            ip = n.get("NodeManagerAddress", "?")
            if ref not in ready:
                views.append(NodeView(n["NodeID"], ip, answered=False))
                continue
            try:
                sees, data = ray.get(ref)
            except ray.exceptions.RayError as e:
                log.debug("storage check on node %s failed: %s", ip, e)
                views.append(NodeView(n["NodeID"], ip, answered=False))
                continue
            views.append(NodeView(n["NodeID"], ip, sees_output=sees or not shared, data=data))
        for ref in refs.values():
            if ref not in ready:
                ray.cancel(ref, force=True)
    finally:
        marker.unlink(missing_ok=True)
    driver_data = fingerprint(str(location.fetched(str(data_path))))
    problems = shared_problems(str(run_dir.parent), str(data_path), driver_data, views, fs_type(run_dir))
    if problems:
        raise UsageError("; ".join(problems))
    log.info("storage: all %d nodes see %s and the same dataset", len(views), run_dir.parent)


# ---------------------------------------------------------------- runs in a bucket

# A head request answers in milliseconds; an endpoint that does not is down or unreachable.
BUCKET_TIMEOUT_S = 5.0
_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
           "credentials")


def bucket_problem(flag: str, uri: str, found: Optional[bool], error: Optional[str]) -> Optional[str]:
    """Why ``uri`` cannot hold runs, from one head request's outcome: ``found`` (whether its
    bucket exists) or the ``error`` the request raised."""
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    if error is None:
        return None if found else f"{flag} {uri}: bucket {bucket!r} does not exist"
    first = error.strip().splitlines()[0] if error.strip() else "no answer"
    if any(token in error for token in _DENIED):
        return f"{flag} {uri}: access to bucket {bucket!r} denied; check the credentials in the environment ({first})"
    endpoint = _endpoint()
    where = f" at {endpoint}" if endpoint else ""
    return f"{flag} {uri}: the object store{where} did not answer ({first}); check the endpoint and the network"


def _endpoint() -> Optional[str]:
    """The S3 endpoint the environment names (``from_uri`` reads these; the constructor does not)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _store_for_check(uri: str):
    """The filesystem of ``uri``, with short timeouts and no retries where the store has them
    (S3), else as ``from_uri`` makes it."""
    import pyarrow.fs

    if uri.lower().startswith("s3://"):
        return pyarrow.fs.S3FileSystem(
            endpoint_override=_endpoint(), connect_timeout=BUCKET_TIMEOUT_S, request_timeout=BUCKET_TIMEOUT_S,
            retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1))
    return location.filesystem(uri)[0]


def check_bucket(uri: str, flag: str = "--output-dir") -> None:
    """Raise UsageError unless the bucket of ``uri`` exists and answers these credentials."""
    import pyarrow.fs

    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    found, error = None, None
    try:
        found = _store_for_check(uri).get_file_info(bucket).type != pyarrow.fs.FileType.NotFound
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        error = str(e)
    problem = bucket_problem(flag, uri, found, error)
    if problem:
        raise UsageError(problem)


def fetch_input(where: str, key: str) -> Path:
    """This machine's copy of an input the config names (``data.path``, ``data.val_path``,
    ``model.init_from``): a local path as it is; a URI's files fetched into the cache
    (``location.fetched``) once its bucket has answered. Raises UsageError starting with ``key``."""
    if not location.is_uri(where):
        return Path(where)
    check_bucket(where, key)
    try:
        return location.fetched(where)
    except OSError as e:  # the bucket answered, but holds nothing there, or a read failed
        raise UsageError(f"{key} {where}: {str(e).splitlines()[0].removeprefix(f'{where}: ')}") from None


def publish(run_dir: Path) -> None:
    """Upload a remote run's mirror to its bucket (no-op for a run directory of its own)."""
    uri = location.uri_of(run_dir)
    if uri is None:
        return
    from orchestrator.runlock import LEASE_FILE, LOCK_FILE

    try:
        location.upload(run_dir, uri, skip=(LOCK_FILE, LEASE_FILE))
    except OSError as e:
        log.error("could not upload %s to %s (%s); the files stay in %s", run_dir.name, uri, e, run_dir)


def fetch_run(uri: str, flag: str) -> Path:
    """The run directory ``uri`` mirrored on this machine without its checkpoints (which stay in the
    bucket), for --resume. Raises UsageError."""
    from orchestrator import runlock

    _check_run(uri, flag)
    local = location.staging(uri)
    live = runlock.holder(local)  # on this machine, else on any (the bucket's lease)
    who = live.describe() if live is not None else runlock.bucket_holder(uri)
    if who is not None:
        raise runlock.in_use(uri, who)
    return location.download(uri, local, skip=("checkpoints", runlock.LEASE_FILE), fresh=False)


def _check_run(uri: str, flag: str) -> None:
    check_bucket(uri, flag)
    if not location.exists(uri):
        raise UsageError(f"{flag} {uri}: run directory not found")


def run_to_read(run_dir: str) -> Path:
    """A run directory to read (export, generate, report): itself, or a bucket's run copied here
    whole, checkpoints included (each is verified where it is used). Raises UsageError."""
    if not location.is_uri(run_dir):
        return Path(run_dir)
    _check_run(run_dir, "RUN_DIR")
    return location.download(run_dir, location.staging(run_dir, location.READ))
