"""Two-worker Ray Train runs on CPU: results contract, env flags, checkpoint and resume."""

import json

import pytest

from orchestrator.run import TrainOptions, train
from tests.conftest import write_config
from trainer.metrics import read_metrics

pytestmark = pytest.mark.ray

SUMMARY_FIELDS = {"status", "attention", "backend", "env", "steps", "first_loss", "final_loss", "tokens_per_s",
                  "peak_mem_bytes", "num_workers", "use_gpu", "restarts", "error"}


def _train(tmp_path, name, overrides=None, **opts):
    cfg = write_config(tmp_path / f"{name}.yaml", overrides)
    return train(TrainOptions(config_file=str(cfg), output_dir=str(tmp_path / "runs"), name=name, **opts))


def test_flash_run_writes_the_summary_contract_and_metrics(ray_session, tmp_path):
    summary = _train(tmp_path, "flash")
    rec = summary.variants["flash"]
    run_dir = tmp_path / "runs" / "flash"
    assert SUMMARY_FIELDS <= json.loads((run_dir / "summary.json").read_text())["variants"]["flash"].keys()
    assert rec.status == "succeeded" and rec.error is None
    assert (rec.attention, rec.backend, rec.env) == ("flash", "sdpa_flash_cpu", {"ATTN_IMPL": "flash"}), rec.reason
    assert rec.steps == 6 and rec.num_workers == 2 and rec.use_gpu is False and rec.restarts == 0
    assert (rec.micro_batch_size, rec.loss_impl, rec.auto) == (4, "standard", {})  # as the config gives them
    assert rec.final_loss < rec.first_loss
    assert rec.tokens_per_s > 0 and rec.peak_mem_bytes > 0
    # GPU figures are n/a on CPU; one fused CPU kernel passes, so there was nothing to time.
    assert (rec.mfu, rec.tokens_per_s_per_gpu, rec.kernel_timings) == (None, None, {})
    assert [w["kernel"] for w in rec.workers] == ["sdpa_flash_cpu"] * 2
    preflight = json.loads((run_dir / "preflight.json").read_text())
    assert preflight["flash_nodes"] and list(preflight["flash_nodes"]) == ["sdpa_flash_cpu"]
    assert json.loads((run_dir / "summary.json").read_text())["variants"]["flash"]["final_loss"] == rec.final_loss
    steps = read_metrics(run_dir / "flash" / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert steps[-1]["loss"] == rec.final_loss
    assert list((run_dir / "flash" / "tb").glob("events.out.tfevents.*"))


def test_disable_flash_attn_gives_workers_both_flags_and_blocks_imports(ray_session, tmp_path):
    summary = _train(tmp_path, "std", disable_flash_attn=True)
    rec = summary.variants["standard"]
    assert rec.status == "succeeded"
    assert rec.env == {"ATTN_IMPL": "standard", "DISABLE_FLASH_ATTN": "1"}
    assert rec.backend == "standard"
    assert all(w["flash_attn_imports_blocked"] for w in rec.workers)
    run = tmp_path / "runs" / "std"
    [node] = json.loads((run / "preflight.json").read_text())["nodes"]
    assert node["facts"]["flash_attn"]["disabled"] and node["verdict"]["reason"] == \
        "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)"
    assert all(k.get("skipped") for k in node["facts"]["kernels"].values())
    assert "; flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)" in (run / "flash_attention_log.txt").read_text()


def test_killed_worker_resumes_from_checkpoint_to_the_same_losses(ray_session, tmp_path):
    """Rank 1 is SIGKILLed at step 5, after the step-3 checkpoint: Ray restarts the group, the
    run resumes at step 3 (model, optimizer, schedule, data position) and every later loss
    matches an uninterrupted run exactly."""
    clean = _train(tmp_path, "clean").variants["flash"]
    faulty = _train(tmp_path, "faulty", {"train": {"fault": {"rank": 1, "step": 5}}}).variants["flash"]
    assert faulty.status == "succeeded" and faulty.restarts == 1
    assert faulty.start_step == 3 and faulty.restored_from.endswith("checkpoint_00000003")
    a = read_metrics(tmp_path / "runs" / "clean" / "flash" / "metrics.jsonl")
    b = read_metrics(tmp_path / "runs" / "faulty" / "flash" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert faulty.final_loss == pytest.approx(clean.final_loss, rel=1e-6)


def test_bf16_weights_under_ddp_resume_after_a_sigkill_to_the_same_losses(ray_session, tmp_path):
    """train.param_dtype bf16 on two DDP workers (bf16 compute on CPU): bf16 gradients all-reduced,
    AdamW on fp32 masters. Rank 1 is SIGKILLed at step 5; the resume from the step-3 checkpoint,
    whose model weights are the fp32 masters, reproduces the uninterrupted run's losses."""
    bf16 = {"dtype": "bf16", "param_dtype": "bf16"}
    clean = _train(tmp_path, "clean", {"train": bf16}).variants["flash"]
    faulty = _train(tmp_path, "faulty", {"train": {**bf16, "fault": {"rank": 1, "step": 5}}}).variants["flash"]
    assert clean.status == faulty.status == "succeeded" and faulty.restarts == 1 and faulty.start_step == 3
    assert (clean.param_dtype, clean.dtype, clean.strategy, clean.num_workers) == ("bf16", "bfloat16", "ddp", 2)
    a = read_metrics(tmp_path / "runs" / "clean" / "flash" / "metrics.jsonl")
    b = read_metrics(tmp_path / "runs" / "faulty" / "flash" / "metrics.jsonl")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert clean.final_loss < clean.first_loss
    import torch

    from trainer import checkpoint

    weights = checkpoint.load_model_state_dict(next((tmp_path / "runs" / "clean" / "flash").rglob("checkpoint_00000006")))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the masters, not their bf16 rounding
    assert any(t.float().sub(t.to(torch.bfloat16).float()).abs().max() > 0 for t in weights.values())
