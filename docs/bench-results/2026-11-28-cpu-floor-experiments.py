"""The two experiments behind docs/BENCHMARKS.md, "2026-11-28 11:20-11:52 UTC" (CPU): a no-op
two-worker TorchTrainer.fit() after ray.init, timed from process start, with one change:

    python docs/bench-results/2026-11-28-cpu-floor-experiments.py off          # neither
    python docs/bench-results/2026-11-28-cpu-floor-experiments.py coordinator  # Ray Train's autoscaling
                                                                              # coordinator created at ray.init
    python docs/bench-results/2026-11-28-cpu-floor-experiments.py preload      # Ray's preload_python_modules
                                                                              # with trainer.loop

Prints one JSON line: ray_start, to_fn (Ray up to the train function on the workers), import
(``import trainer.loop`` inside it), to_after_import. Run 2-3 times per mode, alternating.
"""
import json, logging, sys, tempfile, time
import psutil
t0 = psutil.Process().create_time()
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
mode = sys.argv[1]
cfg = {"preload_python_modules": ["trainer.loop"]} if mode == "preload" else {}
ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, _system_config=cfg)
t_ray = time.time()
if mode == "coordinator":
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import get_or_create_autoscaling_coordinator
    get_or_create_autoscaling_coordinator()
def fn(config):
    t = time.time()
    import trainer.loop  # what our train function's unpickle imports
    return (t, time.time())
with tempfile.TemporaryDirectory() as storage:
    r = TorchTrainer(fn, scaling_config=ScalingConfig(num_workers=2),
                     run_config=RunConfig(storage_path=storage, name="x")).fit()
ray.shutdown()
ts, te = r.return_value
print(json.dumps({"mode": mode, "ray_start": round(t_ray - t0, 2), "to_fn": round(ts - t_ray, 2), "import": round(te - ts, 2),
                  "to_after_import": round(te - t0, 2)}))
