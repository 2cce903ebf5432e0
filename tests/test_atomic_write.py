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
