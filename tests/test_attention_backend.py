"""Adding an attention backend is one registry entry (docs/architecture-attention.md): a dummy
backend registered here is checked by the preflight probe, timed, chosen, kept in the node's
cache, reused by the worker, and named in the variant's record as the kernel that ran."""

import torch

from orchestrator.preflight import probe, rules
from orchestrator.results import VariantResult
from trainer import attention, builder
from trainer.attention import cache, kernels, registry, timing
from trainer.config import ModelConfig, TrainConfig
from trainer.result import Progress, worker_result
from trainer.worker_spec import WorkerSpec

CPU = torch.device("cpu")
SHAPE = attention.AttentionShape(head_dim=16, n_heads=4, n_kv_heads=2, seq_len=32, micro_batch=2)


def test_a_registered_backend_is_checked_timed_chosen_cached_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))  # the registry as it was, after the test
    # The step a new backend takes: one entry. PyTorch's math SDPA kernel stands in for a new one.
    registry.register(registry.Backend(name="dummy", load=lambda: kernels.sdpa("MATH"), order=5, devices=("cpu",)))
    timed = []

    def timer(shape, device, **kw):  # the real timer's place: the dummy times fastest here
        return lambda name, fn: timed.append(name) or {"dummy": 1.0}.get(name, 2.0)

    monkeypatch.setattr(timing, "block_timer", timer)

    # The preflight probe checks it, times it beside the other candidate, and chooses it.
    check, checks, selection = probe.kernel_checks(probe.build_parser().parse_args(["--shape", SHAPE.to_json()]),
                                                   [], disabled=False)
    assert checks["dummy"]["ok"] and timed == ["sdpa_flash_cpu", "dummy"]
    assert selection["kernel"] == "dummy" and selection["timings"] == {"sdpa_flash_cpu": 2.0, "dummy": 1.0}
    verdict = rules.verdict({"flash_attn": {}, "kernels": checks, "kernel_selection": selection})
    assert verdict.flash_kernel == "dummy"

    # The node keeps the verdict (orchestrator/preflight/node.py); the worker reuses it, checking the dummy alone.
    path = cache.path_for(SHAPE, False)
    cache.store(path, cache.node_key(SHAPE, False), {"stdout": ""},
                {"flash_ok": True, "flash_kernel": verdict.flash_kernel, "kernel_timings": verdict.kernel_timings})
    resolved = attention.choose("flash", SHAPE, CPU, log_dir=tmp_path)
    assert resolved.kernel == "dummy" and resolved.verdict["reused"] is True
    assert timed == ["sdpa_flash_cpu", "dummy"]  # nothing timed again

    # The variant's record names the kernel that ran.
    spec = WorkerSpec(variant="flash", model=ModelConfig(), train=TrainConfig(), data_path="d", out_dir=str(tmp_path))
    s = builder.settings(spec.model, spec.train, strategy=spec.strategy, vocab_size=64, device=CPU)
    record = worker_result(spec, s, Progress(), requested="flash", kernel=resolved.kernel,
                           kernel_timings=resolved.timings, env={}, workers=[], params=1, timeline={})
    rec = VariantResult(status="succeeded", **{k: v for k, v in record.items() if k != "variant"})
    assert rec.backend == "dummy" and rec.kernel_timings == {"sdpa_flash_cpu": 2.0, "dummy": 1.0}
