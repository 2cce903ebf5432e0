"""bench/ddp/candidates.py on CPU: the same processes, model build and DDP wrapping over gloo,
on tiny shapes (the figures themselves come from two GPUs: docs/BENCHMARKS.md)."""

import contextlib
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.ddp import candidates


def test_each_variant_runs_in_its_own_processes_and_reports_its_scaling(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert candidates.main([str(out), "--only", "1gpu,bucket_25", "--warmup", "1", "--iters", "2"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["name"], r["world"]) for r in rows] == [("1gpu", 1), ("bucket_25", 2)]
    assert all(r["tok_s"] > 0 and r["step_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| 1gpu | 1 |" in printed and "1.000x" in printed and "| bucket_25 | 2 |" in printed


def test_a_variant_that_fails_is_a_row_with_its_error_and_a_failing_exit(tmp_path):
    # The bf16 compression hook needs NCCL: over gloo both ranks raise.
    out = tmp_path / "rows.json"
    assert candidates.main([str(out), "--only", "bf16_hook", "--warmup", "1", "--iters", "1"]) == 1
    (row,) = json.loads(out.read_text())
    assert row["name"] == "bf16_hook" and "exit codes" in row["error"]


def test_unknown_variant_names_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        candidates.main([str(tmp_path / "x.json"), "--only", "bucket_9"])
    assert "unknown variant(s) bucket_9" in capsys.readouterr().err


NEW_ENV_ROWS = ("nccl_nthreads_256", "nccl_register_alloc", "cuda_max_connections_1", "nccl_min_channels_32")
MP_ROWS = ("1gpu_mp_bf16", "ddp_mp_bf16", "ddp_mp_bf16_fp32_reduce")


def test_the_new_environment_rows_reach_both_ranks():
    # NCCL and CUDA ignore these over gloo: what can break here is the row itself and the
    # plumbing, so the four go together, in one run, as each row sets them.
    rows = {name: (world, change) for name, world, change in candidates.VARIANTS}
    env = {}
    for name in NEW_ENV_ROWS:
        world, change = rows[name]
        assert world == 2 and set(change) == {"env"}, name
        env.update(change["env"])
    assert env == {"NCCL_NTHREADS": "256", "TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK": "1",
                   "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_MIN_NCHANNELS": "32"}
    row = candidates.run_variant("new_env", 2, {"env": env}, steps=(1, 1))
    assert row.get("tok_s", 0) > 0, row
    assert row["env"] == env and row["in_sync"] is True and math.isfinite(row["loss"])


def test_ddp_mixed_precision_rows_run_and_report_against_their_one_gpu_row(tmp_path, capsys):
    # ddp_mp_bf16 differs from the fp32-reduce row by its DDP_MP key alone, which the two tests
    # below cover (its arguments, its gradients): one process fewer here.
    out = tmp_path / "rows.json"
    only = "1gpu_mp_bf16,ddp_mp_bf16_fp32_reduce"
    assert candidates.main([str(out), "--only", only, "--warmup", "1", "--iters", "1"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["name"], r["world"], r["ddp_mp"]) for r in rows] == [
        ("1gpu_mp_bf16", 1, "bf16"), ("ddp_mp_bf16_fp32_reduce", 2, "bf16_fp32")]
    assert all(r["tok_s"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert [r["in_sync"] for r in rows] == [None, True]
    assert "ddp_mp_bf16_fp32_reduce: " in capsys.readouterr().out.splitlines()[-1]


def test_ddp_mixed_precision_arguments_turn_bucket_views_off():
    for name, _, change in candidates.VARIANTS:
        kw = candidates.ddp_kwargs({**change, "ddp": {**change.get("ddp", {}), "gradient_as_bucket_view": True}})
        if name not in MP_ROWS:
            assert "mixed_precision" not in kw, name
            continue
        param, reduce = candidates.DDP_MP[change["ddp_mp"]]
        assert kw["gradient_as_bucket_view"] is False, name
        mp_ = kw["mixed_precision"]
        assert (mp_.param_dtype, mp_.reduce_dtype, mp_.buffer_dtype) == (param, reduce, param), name
    assert candidates.ddp_kwargs({})["gradient_as_bucket_view"] is True


def test_the_scaling_of_a_mixed_precision_row_is_over_its_own_one_gpu_row():
    rows = [{"name": "1gpu", "world": 1, "tok_s": 100.0, "peak_gib": None},
            {"name": "base", "world": 2, "tok_s": 190.0, "peak_gib": None},
            {"name": "1gpu_mp_bf16", "world": 1, "ddp_mp": "bf16", "tok_s": 110.0, "peak_gib": None},
            {"name": "ddp_mp_bf16", "world": 2, "ddp_mp": "bf16", "tok_s": 209.0, "peak_gib": None}]
    lines = candidates.table(rows)
    assert "| base | 2 | 190 | 1.900x | n/a |" in lines  # the plain one-GPU row alone is the baseline
    assert "| ddp_mp_bf16 | 2 | 209 | 2.090x | n/a |" in lines
    assert lines[-1] == "ddp_mp_bf16: 1.900x of 1gpu_mp_bf16 (the same bf16 weights on one GPU)"


def _mp_rank(rank: int, port: int, q) -> None:
    """One rank: DDP's mixed precision as the script sets it up, each step's gradients against
    a bf16 copy of the same weights, its gradients all-reduced by hand."""
    import copy
    import os

    from trainer import attention, parallelize
    from trainer.config import ModelConfig

    candidates._cpu_event_stand_ins()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cpu = torch.device("cpu")
    args = ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=64, vocab_size=64,
                       tie_embeddings=False).args(vocab_size=64, max_seq_len=16)
    fn = attention.checked_fn("standard", device=cpu, dtype=torch.float32, head_dim=args.head_dim, n_heads=2,
                              n_kv_heads=2)
    gen = torch.Generator().manual_seed(rank)

    def tokens():
        return torch.randint(0, args.vocab_size, (2, 16), generator=gen)

    wrong = {}
    for kind, (param, reduce) in candidates.DDP_MP.items():
        raw = parallelize.build_replica(args, fn, device=cpu, seed=0, compile=False)
        plain = parallelize.build_replica(args, fn, device=cpu, seed=0, compile=False)  # no DDP hooks on it
        model = torch.nn.parallel.DistributedDataParallel(raw, **candidates.ddp_kwargs({"ddp_mp": kind}))
        candidates._prime(model, tokens(), tokens(), contextlib.nullcontext())
        wrong[kind] = 0
        for _ in range(3):  # the third backward is the first a bucket view would get wrong
            x, y = tokens(), tokens()
            plain.load_state_dict(raw.state_dict())
            low = copy.deepcopy(plain).to(param)  # buffers too, as buffer_dtype
            low(x, y)[1].backward()
            model(x, y)[1].backward()
            for p, ref in zip(raw.parameters(), low.parameters()):
                want = ref.grad.to(reduce)
                dist.all_reduce(want)
                wrong[kind] += not torch.equal(p.grad, want.div_(2).float())
            with torch.no_grad():  # other weights each step: a stale gradient would differ
                for p in raw.parameters():
                    p.sub_(0.01 * p.grad)
            model.zero_grad(set_to_none=True)
    q.put((rank, wrong))
    dist.destroy_process_group()


def test_ddp_mixed_precision_as_set_up_here_reduces_the_right_gradients():
    # Without _prime the first step's gradients are garbage; with bucket views the third and
    # later are stale (candidates.DDP_MP): both fail here.
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = candidates._free_port()
    procs = [ctx.Process(target=_mp_rank, args=(r, port, q)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        results = dict(q.get(timeout=120) for _ in procs)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert results == {0: {"bf16": 0, "bf16_fp32": 0}, 1: {"bf16": 0, "bf16_fp32": 0}}


def test_bf16_master_rows_run_in_sync_and_report_against_their_one_gpu_row(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert candidates.main([str(out), "--only", "1gpu,1gpu_bf16_master,bf16_master", "--warmup", "1",
                            "--iters", "1"]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert rows["bf16_master"]["in_sync"] is True and rows["bf16_master"]["weights"] == "bf16_master"
    assert all(math.isfinite(r["loss"]) for r in rows.values())
    printed = capsys.readouterr().out
    assert "bf16_master: " in printed and "x of 1gpu_bf16_master (the same bf16 weights on one GPU)" in printed


def test_independent_ranks_train_without_ddp_and_rounds_repeat_the_chosen_rows(tmp_path):
    # What two GPUs of a host do with no communication at all: no DDP wrapper (no replica check),
    # each rank's own pace; --rounds runs the chosen rows again, in turn.
    out = tmp_path / "rows.json"
    assert candidates.main([str(out), "--only", "1gpu,independent", "--rounds", "2", "--warmup", "1",
                            "--iters", "1"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["name"], r["round"]) for r in rows] == [("1gpu", 1), ("independent", 1), ("1gpu", 2),
                                                       ("independent", 2)]
    independent = [r for r in rows if r["name"] == "independent"]
    assert all(r["world"] == 2 and r["in_sync"] is None and r["tok_s"] > 0 for r in independent)
