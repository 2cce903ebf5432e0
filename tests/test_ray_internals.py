"""Ray's private parts that this project relies on (orchestrator/ray_internals.py), checked against
the installed Ray without starting it: a Ray upgrade that changes one fails here, by name."""

import inspect
from pathlib import Path

import ray
from ray.train.v2._internal import constants, exceptions
from ray.train.v2._internal.execution.controller.controller import TrainController
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.train.v2.api.exceptions import ControllerError

from orchestrator import ray_internals
from trainer import checkpoint


def test_the_checkpoint_snapshot_file_is_the_one_ray_train_writes():
    assert constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == checkpoint.SNAPSHOT_FILE


def test_fit_still_hands_the_controller_to_the_sigint_hook_we_override():
    assert f"self.{ray_internals.SIGINT_HOOK}(controller)" in inspect.getsource(DataParallelTrainer)
    assert list(inspect.signature(getattr(DataParallelTrainer, ray_internals.SIGINT_HOOK)).parameters) == [
        "self", "controller"]


def test_ray_init_and_its_head_still_install_their_sigterm_handlers_through_the_hook_we_replace():
    from ray._private import node, worker

    call = f"{ray_internals.RAY_UTILS_MODULE}.{ray_internals.SIGTERM_HOOK}(sigterm_handler)"
    assert call in inspect.getsource(worker.init) and call in inspect.getsource(node.Node)


def test_the_controller_can_still_be_aborted():
    assert callable(getattr(TrainController, ray_internals.CONTROLLER_ABORT))


def test_the_worker_group_start_timeout_is_still_read_from_our_env_var():
    assert constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == ray_internals.START_TIMEOUT_ENV


def test_the_worker_health_check_timeout_is_still_read_from_our_env_var_and_passed_to_the_controller():
    assert constants.WORKER_HEALTH_CHECK_TIMEOUT_S_ENV_VAR == ray_internals.HEALTH_CHECK_TIMEOUT_ENV
    assert ray_internals.HEALTH_CHECK_TIMEOUT_ENV in constants.ENV_VARS_TO_PROPAGATE


def test_placement_failures_still_have_the_names_we_recognise():
    for name in ray_internals.PLACEMENT_FAILURES:
        assert issubclass(getattr(exceptions, name), Exception), name
    assert ray_internals.CONTROLLER_FAILURE_ATTR in inspect.signature(ControllerError).parameters


def test_the_auth_token_logger_and_the_session_dir_are_still_where_we_look():
    import importlib

    importlib.import_module(ray_internals.AUTH_TOKEN_LOGGER)
    assert hasattr(ray._private.worker, "_global_node")
    assert callable(ray._private.node.Node.get_session_dir_path)


def test_the_controller_is_still_started_from_keyword_arguments_that_take_a_failure_policy():
    import importlib

    from ray.train.v2._internal.execution.controller.controller import TrainController

    src = inspect.getsource(getattr(DataParallelTrainer, ray_internals.CONTROLLER_START))
    assert "controller_actor_cls.remote(**controller_init_kwargs)" in src
    assert "failure_policy" in inspect.signature(TrainController).parameters
    module = importlib.import_module(ray_internals.FAILURE_HANDLING_MODULE)
    assert callable(module.DefaultFailurePolicy.make_decision) and module.FailureDecision.RAISE


def test_a_local_ray_can_still_be_bound_to_loopback_by_env_var_and_constant():
    from ray._private import ray_constants

    assert ray_internals.LOOPBACK_ENV in inspect.getsource(ray_constants)
    assert isinstance(getattr(ray_constants, ray_internals.LOOPBACK_CONSTANT), bool)


def test_token_auth_can_still_be_switched_on_after_ray_is_imported():
    import subprocess
    import sys

    # In a process of its own: the switch is process-wide. RAY_AUTH_MODE unset, Ray imported first.
    code = ("import os, ray; os.environ.pop('RAY_AUTH_MODE', None); from ray._raylet import AuthenticationMode, "
            "get_authentication_mode; from orchestrator import ray_internals; before = get_authentication_mode(); "
            "ray_internals.enable_token_auth(); "
            "print(before != AuthenticationMode.TOKEN, get_authentication_mode() == AuthenticationMode.TOKEN, "
            "os.environ['RAY_AUTH_MODE'])")
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_AUTH_MODE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.stdout.split() == ["True", "True", "token"], out.stderr


def test_ray_train_gets_its_autoscaling_coordinator_from_the_function_the_driver_calls_early():
    import importlib

    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    early = getattr(importlib.import_module(ray_internals.AUTOSCALING_COORDINATOR_MODULE),
                    ray_internals.AUTOSCALING_COORDINATOR_GET)
    assert client.get_or_create_autoscaling_coordinator is early
    source = inspect.getsource(early)
    assert "get_if_exists=True" in source and 'lifetime="detached"' in source  # one actor, whoever asks first
    assert client.AUTOSCALING_REQUESTS_GET_TIMEOUT_S == 5  # what the controller waits (the docs quote it)


def test_ray_start_still_writes_its_address_where_ray_down_removes_it():
    source = inspect.getsource(ray._private.utils.write_ray_address)
    assert "get_ray_address_file(temp_dir)" in source
    assert ray_internals.address_file(Path("/t/ray")) == Path("/t/ray/ray_current_cluster")
