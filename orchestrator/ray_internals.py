"""Every private part of Ray this project relies on, in one place.

Ray does not promise to keep these across releases; ``tests/test_ray_internals.py`` checks
each one against the installed Ray without starting it, so a Ray upgrade that changes one
fails there, by name, rather than somewhere in a run. Tested with Ray 2.60. The one the worker
needs too, the name of the checkpoint snapshot file, is ``trainer.checkpoint.SNAPSHOT_FILE``.
"""

from __future__ import annotations

from pathlib import Path

# The method DataParallelTrainer.fit calls with the controller actor (main thread only) to
# install Ray's own SIGINT handler; orchestrator/launch.py overrides it to keep the handle
# and leave signals to the driver.
SIGINT_HOOK = "_register_sigint_handler"

# The DataParallelTrainer method that builds the controller actor from keyword arguments;
# orchestrator/launch.py overrides it to add ``failure_policy`` (no public argument takes one),
# a subclass of Ray Train's DefaultFailurePolicy (orchestrator/failure_policy.py imports it
# from FAILURE_HANDLING_MODULE).
CONTROLLER_START = "_initialize_and_run_controller"
FAILURE_HANDLING_MODULE = "ray.train.v2._internal.execution.failure_handling"

# The function (in RAY_UTILS_MODULE) through which ray.init installs Ray's SIGTERM handlers
# (sys.exit) before it connects; orchestrator/session.py keeps the driver's own in place.
SIGTERM_HOOK = "set_sigterm_handler"
RAY_UTILS_MODULE = "ray._private.utils"

# The controller actor's method that stops a run gracefully (TrainController.abort).
CONTROLLER_ABORT = "abort"

# Read by Ray Train's worker group when it waits for its placement group
# (ray.train.v2._internal.constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"

# Read by Ray Train's worker group: a worker that has not answered the controller's poll for
# this long is marked dead, by rank, and its group handled as failed (a frozen process: a
# SIGSTOP, a GPU call that never returns while holding the GIL)
# (ray.train.v2._internal.constants.WORKER_HEALTH_CHECK_TIMEOUT_S_ENV_VAR).
HEALTH_CHECK_TIMEOUT_ENV = "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"

# TrainingFailedError's attribute holding the controller's exception, and the class names
# (ray.train.v2._internal.exceptions) that mean the workers could not be placed.
CONTROLLER_FAILURE_ATTR = "controller_failure"
PLACEMENT_FAILURES = ("WorkerGroupStartupTimeoutError", "InsufficientClusterResourcesError")

# Read when ray_constants is imported: "0" binds a local Ray to 127.0.0.1 and every process it
# starts inherits it; a Ray already imported reads ray_constants.ENABLE_RAY_CLUSTER instead
# (orchestrator/session.py sets both).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_CONSTANT = "ENABLE_RAY_CLUSTER"

# The logger that announces token authentication on every local ray.init().
AUTH_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"

# Ray reads RAY_AUTH_MODE into its C++ config when it is loaded, so a driver that already
# imported Ray and joins a token-auth head (orchestrator/kept_ray.py) must have it read again:
# this function of AUTH_TOKEN_LOGGER's module sets the env var and re-initialises the config.
TOKEN_AUTH_ENABLE = "_enable_token_auth"


# Ray Train V2's controller asks this detached actor (Ray Data's autoscaling coordinator) for its
# workers' resources and waits up to 5 s for the answer (AUTOSCALING_REQUESTS_GET_TIMEOUT_S in
# ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client, which calls
# this same function). The first fit() on a Ray creates it: a new process that imports Ray Data.
AUTOSCALING_COORDINATOR_MODULE = "ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator"
AUTOSCALING_COORDINATOR_GET = "get_or_create_autoscaling_coordinator"


def start_autoscaling_coordinator() -> None:
    """Create Ray Train's autoscaling coordinator on this node now, or find the one running,
    without waiting for its process: it then starts while the driver probes and plans, rather
    than while the first controller waits for it."""
    import importlib

    getattr(importlib.import_module(AUTOSCALING_COORDINATOR_MODULE), AUTOSCALING_COORDINATOR_GET)()


def enable_token_auth() -> None:
    """Token auth on for this process (and the processes it starts), Ray imported or not."""
    import importlib

    getattr(importlib.import_module(AUTH_TOKEN_LOGGER), TOKEN_AUTH_ENABLE)()


def local_session_dir() -> Path:
    """The session directory (logs, sockets) of the Ray this process started with ray.init()."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path())


def address_file(temp_dir: Path | None) -> Path:
    """Where ``ray start --head`` leaves its address (in Ray's temp dir, the default one for None),
    which a later ``ray.init()`` with no address joins."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(str(temp_dir) if temp_dir else None))
