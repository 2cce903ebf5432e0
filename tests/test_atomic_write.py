"""Every cache and run file is written atomically: readers and concurrent writers never see half
a file, and a failed write leaves the old file and no temporary behind."""

import json
import threading

import pytest

from trainer import atomic_write


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "entry.json"
    atomic_write.write_json(path, {"kernel": "sdpa_cudnn"})
    with pytest.raises(TypeError):
        atomic_write.write_bytes(path, "not bytes")  # fails inside the write
    assert json.loads(path.read_text()) == {"kernel": "sdpa_cudnn"}
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]


def test_concurrent_writers_in_one_process_leave_one_whole_file(tmp_path):
    path = tmp_path / "entry.json"
    payloads = [{"writer": i, "pad": "x" * 200_000} for i in range(8)]
    threads = [threading.Thread(target=atomic_write.write_json, args=(path, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(path.read_text()) in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_file_written_atomically_has_the_mode_a_plain_open_gives(tmp_path, umask):
    """mkstemp's 0600 made summary.json and options.json private beside a 0644 config.yaml (issue 32)."""
    import os

    old = os.umask(umask)
    try:
        atomic_write.write_text(tmp_path / "atomic.json", "{}")
        (tmp_path / "plain.yaml").write_text("{}")
    finally:
        os.umask(old)
    modes = {p.name: os.stat(p).st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"atomic.json": 0o666 & ~umask, "plain.yaml": 0o666 & ~umask}
