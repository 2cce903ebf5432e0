"""Where results go: file URIs and job working dirs, and the multi-node shared-path verdict."""

from __future__ import annotations

import pytest

from orchestrator.storage import DataFingerprint, NodeView, output_dir_problem, shared_problems

DATA = DataFingerprint(num_tokens=1000, vocab_size=512, nbytes=2000)
JOB_CWD = "/tmp/ray/session_2026/runtime_resources/working_dir_files/_ray_pkg_abc123"


def node(i: int, **kw) -> NodeView:
    return NodeView(node_id=f"{i:08x}" * 7, ip=f"10.0.0.{i}", **{"sees_output": True, "data": DATA, **kw})


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://bucket/runs", "abfss://c@acct.dfs.core.windows.net/x"])
def test_object_store_uris_are_accepted_here_and_asked_by_check_bucket(uri):
    assert output_dir_problem(uri, "/home/me") is None


def test_a_file_uri_is_refused_with_its_plain_path():
    assert "use the plain path '/mnt/shared/runs'" in output_dir_problem("file:///mnt/shared/runs", "/home/me")


def test_a_relative_output_dir_inside_a_job_working_dir_is_refused():
    msg = output_dir_problem("runs", JOB_CWD)
    assert "relative path" in msg and JOB_CWD in msg and "absolute" in msg


@pytest.mark.parametrize("out,cwd", [("runs", "/home/me/project"), ("/mnt/shared/runs", JOB_CWD), ("./runs", "/tmp")])
def test_plain_paths_are_fine(out, cwd):
    assert output_dir_problem(out, cwd) is None


def test_one_node_needs_nothing_shared():
    assert shared_problems("runs", "/data", DATA, [node(1, sees_output=False, data=None)]) == []


def test_several_nodes_that_all_see_the_run_and_data_are_fine():
    assert shared_problems("/mnt/shared/runs", "/mnt/shared/data", DATA, [node(1), node(2), node(3)]) == []


def test_a_node_local_output_dir_on_several_nodes_is_an_error_naming_the_nodes_and_the_fix():
    (msg,) = shared_problems("/home/me/runs", "/mnt/shared/data", DATA,
                             [node(1), node(2, sees_output=False), node(3, sees_output=False)], fs_type="ext4")
    assert msg.startswith("--output-dir /home/me/runs is not shared: node(s) 10.0.0.2")
    assert "10.0.0.3" in msg and "10.0.0.1" not in msg
    assert "ext4, a filesystem local to this machine" in msg and "NFS" in msg and "3 nodes" in msg


def test_missing_and_different_data_are_reported_per_node():
    other = DataFingerprint(num_tokens=999, vocab_size=512, nbytes=1998)
    problems = shared_problems("/mnt/shared/runs", "/home/me/data", DATA,
                               [node(1), node(2, data=None), node(3, data=other)])
    assert len(problems) == 2
    assert problems[0].startswith("data /home/me/data is missing on node(s) 10.0.0.2")
    assert "10.0.0.3" in problems[1] and "differs" in problems[1]


def test_a_node_that_does_not_answer_is_an_error():
    (msg,) = shared_problems("/mnt/shared/runs", "/d", DATA, [node(1), node(2, answered=False)])
    assert "10.0.0.2" in msg and "did not answer" in msg
