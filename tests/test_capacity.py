"""Checks that need only the cluster's answer: room for the workers, a reachable address."""

import socket

import pytest

from orchestrator import capacity, session
from orchestrator.config import ScalingConfig
from orchestrator.errors import UsageError


@pytest.mark.parametrize("scaling,resources,message", [
    ({"num_workers": 4}, {"CPU": 2}, "scaling.num_workers 4 x cpus_per_worker 1 needs 4 CPUs; the cluster has 2"),
    ({"num_workers": 2, "cpus_per_worker": 1.5}, {"CPU": 2}, "needs 3 CPUs"),
    ({"num_workers": 2, "use_gpu": True}, {"CPU": 8, "GPU": 1}, "use_gpu true with num_workers 2 needs 2 GPUs; the cluster has 1"),
])
def test_a_config_bigger_than_the_cluster_is_refused_naming_the_key(scaling, resources, message):
    with pytest.raises(UsageError, match="^c.yaml: ") as e:
        capacity.check_fits(ScalingConfig(**scaling), resources, "c.yaml")
    assert message in str(e.value)


@pytest.mark.parametrize("scaling,resources", [
    ({"num_workers": 2}, {"CPU": 2}),
    ({"num_workers": 2, "use_gpu": "auto"}, {"CPU": 2}),  # auto: CPU when there are no GPUs
    ({"num_workers": 2, "use_gpu": True}, {"CPU": 2, "GPU": 2}),
])
def test_a_config_that_fits_passes(scaling, resources):
    capacity.check_fits(ScalingConfig(**scaling), resources, "c.yaml")


@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1:6379", ("127.0.0.1", 6379)), ("ray://127.0.0.1:10001", ("127.0.0.1", 10001)),
    ("auto", None), ("localhost", None),
])
def test_host_port_of_an_address(address, expected):
    assert session.host_port(address) == expected


def test_an_address_where_nothing_listens_fails_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UsageError, match=f"--address 127.0.0.1:{port}: no Ray cluster answers"):
        session.check_reachable(f"127.0.0.1:{port}")


@pytest.mark.parametrize("num_workers,use_gpu,gpus,slots,expected", [
    ("auto", "auto", 1, 1, capacity.Workers(1, "1 GPU found")),
    ("auto", "auto", 8, 8, capacity.Workers(8, "8 GPUs found")),
    ("auto", "auto", 0, 0, capacity.Workers(2, "no GPU found")),
    ("auto", True, 4, 4, capacity.Workers(4, "4 GPUs found")),
    ("auto", False, 8, 8, capacity.Workers(2, "use_gpu false")),
    ("auto", "auto", 16, 16, capacity.Workers(8, "16 GPUs found, auto takes at most 8")),
    ("auto", "auto", 8, 3, capacity.Workers(3, "8 GPUs found, CPUs for 3 worker(s) beside them")),
    (2, "auto", 1, 1, capacity.Workers(2)),  # the user's number wins, auto or not
])
def test_num_workers_auto_takes_one_worker_per_gpu_found_else_two_cpu_workers(num_workers, use_gpu, gpus, slots,
                                                                               expected):
    assert capacity.workers(num_workers, use_gpu, gpus, slots) == expected


@pytest.mark.parametrize("resources,message", [
    ({"CPU": 1}, "scaling.num_workers 2 x cpus_per_worker 1 needs 2 CPUs; the cluster has 1 "
                 "(num_workers auto: no GPU found)"),
    ({"CPU": 8}, None),
    ({"CPU": 8, "GPU": 1}, None),
])
def test_the_default_scaling_fits_a_gpu_machine_and_a_two_cpu_one(resources, message):
    if message is None:
        capacity.check_fits(ScalingConfig(), resources, "built-in config")
        return
    with pytest.raises(UsageError, match="^built-in config: ") as e:
        capacity.check_fits(ScalingConfig(), resources, "built-in config")
    assert message in str(e.value)
