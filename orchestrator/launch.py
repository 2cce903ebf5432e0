"""Launch: one Ray Train ``TorchTrainer`` per planned variant, its attention flag in the
workers' environment before their processes start, and its outcome as a summary record.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from pathlib import Path
from typing import Optional

from orchestrator import interrupt, ray_internals, results
from orchestrator.failure_log import FailureLog, one_line
from orchestrator.plan import PlannedVariant
from orchestrator.progress import ProgressFollower
from trainer import checkpoint, driver_watch, failures
from trainer.loop import train_loop_per_worker
from trainer.save_restore import store_of
from trainer.worker_spec import WorkerSpec
from trainer.metrics import METRICS_FILE, read_attempts, read_metrics

log = logging.getLogger(__name__)

# Ray's abort most often returns within a second, at times only after 10 s and more: waiting
# longer than this is past what a process manager allows after SIGTERM. The workers on the
# driver's host stop on their own meanwhile (trainer/driver_watch.py), and the others end with
# the driver's job.
ABORT_TIMEOUT_S = 4.0


def _placement_error(err: BaseException, v: PlannedVariant, timeout_s: float) -> str | None:
    """A clear message when Ray Train gave up placing the workers, else None."""
    failure = getattr(err, ray_internals.CONTROLLER_FAILURE_ATTR, None)
    if type(failure).__name__ not in ray_internals.PLACEMENT_FAILURES:
        return None
    need = " + ".join(f"{x:g} {k}" for k, x in v.demand().items())
    where = f" with label selector {v.label_selector}" if v.label_selector else ""
    return (f"could not place {v.count()} worker(s) x ({need}){where} within {timeout_s:g} s "
            "(scaling.placement_timeout_s): the resources are held by something else, or the nodes are gone")


def worker_threads_env(cpus_per_worker: float, environ=None) -> dict[str, str]:
    """One intra-op thread per CPU the worker holds, so workers sharing a node do not fight over
    its cores (PyTorch would start one thread per core in each). Set before the worker process
    starts, so torch sees it on import; a value in the driver's environment wins."""
    env = os.environ if environ is None else environ
    return {} if "OMP_NUM_THREADS" in env else {"OMP_NUM_THREADS": str(max(1, int(cpus_per_worker)))}


def count_attempts(variant_dir: Path, since: float) -> int:
    """Worker-group starts of a variant since ``since``."""
    return sum(isinstance(a.get("time"), (int, float)) and a["time"] >= since for a in read_attempts(variant_dir))


def _trainer_class():
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        """A TorchTrainer that leaves SIGINT to the driver (orchestrator/interrupt.py).

        Ray's own handler aborts on Ctrl-C but then exits the driver with status 0 and covers
        only SIGINT; ours handles SIGTERM too and ends with 130/143. The controller handle is
        kept so the driver can abort the workers gracefully.
        """

        controller = None

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            from orchestrator.failure_policy import FailFastPolicy

            # A deterministic worker failure is not retried (orchestrator/failure_policy.py);
            # the method is Ray's private one (ray_internals.CONTROLLER_START).
            controller_init_kwargs["failure_policy"] = FailFastPolicy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    def keep_controller(self, controller):
        self.controller = controller

    setattr(Trainer, ray_internals.SIGINT_HOOK, keep_controller)  # replaces Ray's SIGINT handler
    return Trainer


def _abort(trainer) -> None:
    """Stop the controller and its workers; a checkpoint Ray already committed stays the latest."""
    import ray

    if trainer.controller is None:
        return
    try:
        ray.get(getattr(trainer.controller, ray_internals.CONTROLLER_ABORT).remote(), timeout=ABORT_TIMEOUT_S)
    except Exception as e:  # the controller exits as it aborts: RayActorError is the normal answer
        log.debug("controller abort: %s", one_line(e))


def run_variant(v: PlannedVariant, spec: WorkerSpec, *, max_failures: int, keep_checkpoints: int,
                placement_timeout_s: float = 60.0, hang_timeout_s: float = 300.0, resize_interval_s: float = 60.0,
                worker_env: Optional[dict[str, str]] = None) -> results.VariantResult:
    """Train one variant to completion (or failure) and return its summary record.

    Placement is tried once: with ``controller_failure_limit=0`` Ray Train gives up when the
    workers cannot be placed within the start timeout (``execute.START_TIMEOUT_ENV``) instead
    of retrying forever. Worker failures after placement are retried ``max_failures`` times.
    A collective that waits ``hang_timeout_s`` fails (gloo and NCCL both take the timeout from
    ``init_process_group``, which Ray Train calls with ``TorchConfig.timeout_s``). An elastic
    variant checks every ``resize_interval_s`` whether the cluster holds more workers.
    """
    import ray.train
    from ray.train.torch import TorchConfig

    vdir = Path(spec.out_dir)
    vdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config=spec.model_dump(),
        torch_config=TorchConfig(timeout_s=max(1, math.ceil(hang_timeout_s))),
        scaling_config=ray.train.ScalingConfig(
            num_workers=v.workers_arg(),
            elastic_resize_monitor_interval_s=resize_interval_s,
            use_gpu=v.use_gpu,
            resources_per_worker=v.demand(),
            label_selector=v.label_selector,
        ),
        run_config=ray.train.RunConfig(
            name=checkpoint.STORAGE_NAME,
            # A bucket's URI: Ray builds its filesystem from it on each process, credentials from
            # the environment (none of them travel in Ray's objects).
            storage_path=spec.storage_uri or str(vdir.resolve()),
            # An elastic group is placed again: Ray Train's view of the cluster lags a lost node
            # by up to 20 s (its autoscaling coordinator's tick), so its first try may ask for too many.
            failure_config=ray.train.FailureConfig(max_failures=max_failures, controller_failure_limit=(
                0 if v.max_workers is None else max_failures)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=[FailureLog(str(vdir.resolve()))],  # which ranks ended each failed attempt, and how
            # Set before each worker process starts, so even its first import sees them.
            # The driver's identity lets the workers on its host stop when it dies (trainer/driver_watch.py).
            worker_runtime_env={"env_vars": {**worker_threads_env(v.cpus_per_worker), **v.env,
                                             **driver_watch.env_for_workers(), **(worker_env or {})}},
        ),
    )
    record = {"status": "failed", "attention": v.attention, "backend": None, "env": v.env, "error": None,
              "reason": v.reason}
    # A resume: Ray must never hand a worker a checkpoint that does not verify (logged when dropped).
    store = store_of(spec, "driver")
    checkpoint.drop_unusable(store)
    with ProgressFollower(vdir / METRICS_FILE, v.name, spec.train.max_steps):
        try:
            result = trainer.fit()
            error = result.error
        except KeyboardInterrupt as e:  # SIGINT/SIGTERM (orchestrator/interrupt.py)
            error = interrupt.as_interrupted(e)
            log.warning("[%s] stopping the workers (%s)", v.name, error)
            with driver_watch.workers_stopping():
                _abort(trainer)
            result = None
            record["status"] = "interrupted"
        except Exception as e:  # Ray raises TrainingFailedError (and friends) from fit()
            result, error = None, e
            log.debug("variant %s failed:\n%s", v.name, traceback.format_exc())
        finally:
            # What killed workers left behind: partial checkpoints, uploads Ray never registered.
            checkpoint.prune_unregistered(store)
    if record["status"] == "interrupted":  # said once nothing writes there any more, as resume will choose
        kept = checkpoint.newest_usable(store)
        log.warning("[%s] %s", v.name, f"--resume continues from {kept.name}" if kept
                    else "no checkpoint was written yet: --resume starts this variant from step 0")
    if error is None and result is not None and isinstance(result.return_value, dict):
        record.update({k: x for k, x in result.return_value.items() if k != "variant"})  # the name is the key
        record["attention"] = v.attention  # the request; the worker's flags are in 'env'
        record["status"] = "succeeded"
    else:
        deterministic = failures.find(error) if error else None
        if deterministic is not None:
            record["failure_kind"] = deterministic.kind
        record["error"] = ((_placement_error(error, v, placement_timeout_s) or
                            (str(deterministic) if deterministic else one_line(error))) if error
                           else "training returned no result")
    attempts = count_attempts(vdir, started)
    record["restarts"] = max(0, attempts - 1)
    if record["status"] == "failed" and attempts and "failure_kind" not in record:  # say which knob allows more
        record["error"] += (f" (gave up after {record['restarts']} restart(s): scaling.max_failures is "
                            f"{max_failures})")
    logged = read_metrics(vdir / METRICS_FILE)
    if "steps" not in record:  # the worker returned no result: count what it logged
        record["steps"] = logged[-1]["step"] if logged else 0
    record.update(results.validation_fields(logged))
    record.update(results.straggler_fields(logged))
    record.setdefault("num_workers", v.num_workers)
    record.setdefault("use_gpu", v.use_gpu)
    ended = time.time()
    record["wall_time_s"] = round(ended - started, 3)
    record["started_at"], record["ended_at"] = started, ended  # epoch seconds: shows concurrent variants overlap
    return results.VariantResult(**record)
