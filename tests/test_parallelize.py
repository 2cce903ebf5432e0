"""Sharding without Ray: the shapes FSDP refuses, the sharded build's weights, and DCP
checkpoints across worker counts; plus the checkpoint disk checks and Ray-snapshot repair."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer import checkpoint, parallel, parallelize
from trainer.parallel import ddp
from trainer.parallel.fsdp import ShardingError, check_shardable
from trainer.model import ModelArgs, Transformer

ARGS = ModelArgs(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16)


def _attn(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_a_model_built_before_its_kernel_was_chosen_runs_once_it_is_set_and_never_before():
    """trainer.loop builds the model beside the kernel's check, with ``attention.unresolved``."""
    from trainer import attention

    model = parallelize.build_replica(ARGS, attention.unresolved, device=torch.device("cpu"), seed=0, compile=False)
    idx = torch.randint(0, ARGS.vocab_size, (2, 16))
    with pytest.raises(RuntimeError, match="before its kernel was chosen"):
        model(idx)
    parallelize.set_attention(model, _attn)
    want = parallelize.build_replica(ARGS, _attn, device=torch.device("cpu"), seed=0, compile=False)
    assert torch.equal(model(idx), want(idx))


def test_fsdp_refuses_a_model_with_a_dimension_smaller_than_the_worker_count():
    with pytest.raises(ShardingError, match=r"fsdp over 64 workers .* model\.dim .* = 32"):
        check_shardable(ARGS, 64)
    check_shardable(ARGS, 2)


UNTIED_GQA = ModelArgs(vocab_size=96, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_hidden=96, max_seq_len=16,
                       tie_embeddings=False, activation_checkpointing=True)


def _ddp_build(monkeypatch, args: ModelArgs, device: torch.device, seed: int = 7, float8: str | None = None):
    """The DDP path of ``build`` on one worker (no DDP wrapper)."""
    model, raw = parallel.get("ddp").build(args, _attn, device=device, seed=seed, compile=False, world_size=1,
                                           float8=float8)
    assert model is raw
    return raw


def _draws(monkeypatch) -> list[tuple[str, torch.Tensor, torch.Generator | None]]:
    """Record every init draw: the parameter's name, the tensor filled and the generator used."""
    seen = []
    real = Transformer.draw_init

    def spy(self, name, out, generator=None):
        seen.append((name, out, generator))
        real(self, name, out, generator)

    monkeypatch.setattr(Transformer, "draw_init", spy)
    return seen


@pytest.mark.parametrize("args", [ARGS, UNTIED_GQA], ids=["tied", "untied-gqa"])
def test_the_meta_built_model_replays_transformers_own_cpu_init_bit_for_bit(monkeypatch, args):
    model = _ddp_build(monkeypatch, args, torch.device("cpu"))
    torch.manual_seed(7)
    plain = Transformer(args, _attn)
    assert model.state_dict().keys() == plain.state_dict().keys()
    for name, want in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], want), name
    for buf in ("rope_cos", "rope_sin"):  # not in the state dict: computed for real, not left empty
        assert torch.equal(getattr(model, buf), getattr(plain, buf)), buf
    assert (model.output.weight is model.tok_embeddings.weight) == args.tie_embeddings
    x = torch.arange(24).reshape(2, 12) % args.vocab_size
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_the_init_is_drawn_into_the_parameters_by_a_generator_on_their_device_not_torchs_global_one(monkeypatch):
    draws = _draws(monkeypatch)
    before = torch.get_rng_state()
    model = _ddp_build(monkeypatch, UNTIED_GQA, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before), "the build drew from torch's global CPU generator"
    params = dict(model.named_parameters())
    real = [d for d in draws if not d[1].is_meta]  # the constructor's own draws, on meta, cost nothing
    assert [name for name, _, _ in real] == list(params)
    for name, out, gen in real:
        assert out is params[name], f"{name}: drawn into a separate tensor, then copied"
        assert gen is not None and gen.device == out.device == torch.device("cpu"), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_every_weight_is_drawn_by_a_cuda_generator(monkeypatch):
    draws = _draws(monkeypatch)
    before = torch.get_rng_state()
    model = _ddp_build(monkeypatch, UNTIED_GQA, torch.device("cuda"))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.device.type == "cuda" for p in model.parameters()) and model.rope_cos.device.type == "cuda"
    real = [d for d in draws if not d[1].is_meta]
    assert real and all(out.device.type == gen.device.type == "cuda" for _, out, gen in real)
    gen = torch.Generator(device="cuda").manual_seed(7)
    want = torch.empty(model.tok_embeddings.weight.shape, device="cuda").normal_(0.0, 0.02, generator=gen)
    assert torch.equal(model.tok_embeddings.weight, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_fsdp_and_ddp_start_from_the_same_weights(monkeypatch):
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        device = torch.device("cuda")
        fsdp, _ = parallel.get("fsdp").build(UNTIED_GQA, _attn, device=device, seed=7, compile=False,
                                             world_size=1)
        full = {k: v.full_tensor() for k, v in fsdp.state_dict().items()}
        ddp = _ddp_build(monkeypatch, UNTIED_GQA, device)
        assert full.keys() == ddp.state_dict().keys()
        for name, want in ddp.state_dict().items():
            assert torch.equal(full[name], want), name
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with fp8 (compute capability 8.9+)")
def test_float8_layers_are_converted_on_meta_and_get_the_same_replayed_init(monkeypatch):
    pytest.importorskip("torchao")
    device = torch.device("cuda")
    plain = _ddp_build(monkeypatch, UNTIED_GQA, device)
    f8 = _ddp_build(monkeypatch, UNTIED_GQA, device, float8="tensorwise")
    assert sum(type(m).__name__ == "Float8Linear" for m in f8.modules()) == 7 * UNTIED_GQA.n_layers
    for (name, p), q in zip(f8.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), name
    x = torch.arange(32, device=device).reshape(2, 16) % UNTIED_GQA.vocab_size
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = f8(x, x)[1]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in f8.parameters())


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("options,broadcasts", [("ours", 0), ("torch's defaults", 1)])
def test_ddp_does_not_broadcast_the_rotary_tables_before_every_forward(one_rank_group, monkeypatch, options, broadcasts):
    torch.manual_seed(0)
    wrapped = torch.nn.parallel.DistributedDataParallel(
        Transformer(ARGS, _attn), **(ddp.options() if options == "ours" else {}))
    calls = []
    monkeypatch.setattr(wrapped, "_sync_buffers", lambda: calls.append(1))
    x = torch.arange(24).reshape(2, 12) % ARGS.vocab_size
    wrapped(x, x)[1].backward()
    assert len(calls) == broadcasts


def test_a_disk_too_small_for_a_checkpoint_is_refused_before_writing(tmp_path):
    with pytest.raises(checkpoint.DiskFull, match=r"^\[Errno 28\] no space left on device: checkpoint .*needs about"):
        checkpoint.check_free_space(tmp_path / "checkpoint_00000003", 1 << 60)
    checkpoint.check_free_space(tmp_path / "checkpoint_00000003", 1 << 10)


def test_enospc_is_recognised_however_torch_save_reports_it():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0") from e
    except RuntimeError as wrapped:
        assert checkpoint.is_disk_full(wrapped)
    assert not checkpoint.is_disk_full(RuntimeError("unexpected pos 64 vs 0"))


def _ddp_checkpoint(directory: Path, step: int) -> None:
    directory.mkdir(parents=True)
    checkpoint.write(directory, 0, {"step": step, "model": {}, "optimizer": {}}, 1)


def _registered_checkpoints(storage: Path, steps: tuple[int, ...]) -> list[str]:
    names = [f"checkpoint_{s:08d}" for s in steps]
    for s, name in zip(steps, names):
        _ddp_checkpoint(storage / name, s)
    results = [{"checkpoint_dir_name": n, "metrics": {}} for n in names]
    (storage / checkpoint.SNAPSHOT_FILE).write_text(json.dumps({
        "checkpoint_results": results, "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": results[-1], "pending_training_results": []}))
    return names


def test_a_registered_checkpoint_that_fails_verification_is_removed_from_rays_snapshot(tmp_path):
    names = _registered_checkpoints(tmp_path / checkpoint.STORAGE_NAME, (3, 6, 9))
    (tmp_path / checkpoint.STORAGE_NAME / names[2] / checkpoint.STATE_FILE).write_bytes(b"flipped")

    storage = tmp_path / checkpoint.STORAGE_NAME
    rejected = tmp_path / checkpoint.REJECTED_NAME
    dropped = checkpoint.drop_unusable(storage)
    snap = json.loads((storage / checkpoint.SNAPSHOT_FILE).read_text())
    assert dropped == [f"skipped checkpoint {names[2]}, moved into {rejected}: {storage / names[2] / 'state.pt'}: "
                       "missing or does not match its checksum"]
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == names[:2]
    assert snap["checkpoint_report_indices"] == [0, 1]
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == names[1]
    assert not (storage / names[2]).exists()
    assert (rejected / names[2] / checkpoint.STATE_FILE).read_bytes() == b"flipped"  # kept, for a look
    assert checkpoint.drop_unusable(storage) == []


def test_when_no_checkpoint_verifies_resume_says_it_starts_over_and_keeps_the_files(tmp_path):
    """It deleted them all and started from step 0 without a word."""
    storage = tmp_path / checkpoint.STORAGE_NAME
    names = _registered_checkpoints(storage, (3, 6))
    for name in names:
        (storage / name / checkpoint.STATE_FILE).write_bytes(b"flipped")
    dropped = checkpoint.drop_unusable(storage)
    assert dropped[-1] == f"no checkpoint in {storage} verifies: this variant starts again from step 0"
    assert sorted(p.name for p in (tmp_path / checkpoint.REJECTED_NAME).iterdir()) == names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, directory: str, step: bool, strategy: str) -> None:
    """Build the model of ``strategy`` over gloo; save a DCP checkpoint as the Saver does (step=True) or load one."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, raw = parallel.get(strategy).build(ARGS, _attn, device=torch.device("cpu"), seed=7,
                                                  compile=False, world_size=world)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ckpt = Path(directory) / "checkpoint_00000001"
        if step:
            initial = {k: _whole(v) for k, v in raw.state_dict().items()}  # collective
            if rank == 0:
                torch.save(initial, Path(directory) / "initial.pt")
                ckpt.mkdir()
            x = torch.arange(32).reshape(2, 16) % ARGS.vocab_size
            model(x, x.roll(-1, 1))[1].backward()
            optimizer.step()
            dist.barrier()
            sharded = checkpoint.sharded_state(raw, optimizer)
            if not parallel.get(strategy).shards:
                sharded = checkpoint.replica_share(sharded, rank, world)
            checkpoint.write(ckpt, rank, {"step": 1, "world_size": world} if rank == 0 else None, world,
                             sharded=sharded)
        else:
            checkpoint.load(ckpt, raw, optimizer)
        after = _full(raw, optimizer)  # collective
        if rank == 0:
            torch.save(after, Path(directory) / f"after_{'save' if step else 'load'}.pt")
        dist.barrier()  # both ranks past their last collective: gloo aborts a rank torn down mid-send
    finally:
        dist.destroy_process_group()


@pytest.mark.ray  # not Ray, but three spawned torch processes: too slow for the unit loop
@pytest.mark.parametrize("saved, loaded", [("fsdp", "fsdp"), ("ddp", "fsdp"), ("fsdp", "ddp")])
def test_a_checkpoint_of_two_workers_loads_into_one_of_either_strategy(tmp_path, saved, loaded):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), True, saved), nprocs=2)
    torch.manual_seed(7)
    reference = Transformer(ARGS, _attn).state_dict()
    initial = torch.load(tmp_path / "initial.pt")
    assert all(torch.equal(initial[k], reference[k]) for k in reference)  # sharded build == Transformer's init

    ckpt = tmp_path / "checkpoint_00000001"
    checkpoint.verify(ckpt)
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    if saved == "ddp":  # each rank wrote about half the tensors' bytes
        sizes = [(ckpt / "dcp" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
        assert max(sizes) < 0.6 * sum(sizes), sizes

    mp.spawn(_worker, args=(1, _free_port(), str(tmp_path), False, loaded), nprocs=1)
    saved_state, loaded_state = torch.load(tmp_path / "after_save.pt"), torch.load(tmp_path / "after_load.pt")
    _assert_equal(loaded_state, saved_state)
    exported = checkpoint.load_model_state_dict(ckpt)  # no process group
    assert exported.keys() == saved_state["model"].keys()
    assert all(torch.equal(exported[k], saved_state["model"][k]) for k in exported)


def _built(name: str, param_dtype: str):
    """A model of strategy ``name`` on one worker with ``train.param_dtype`` weights, and its
    optimizer (AdamW on fp32 masters where the weights are bf16, as ``trainer.optim`` builds it)."""
    from trainer.config import TrainConfig
    from trainer.master_weights import torch_dtype
    from trainer.optim import optimizer_for

    model, raw = parallel.get(name).build(ARGS, _attn, device=torch.device("cpu"), seed=7, compile=False,
                                          world_size=1, param_dtype=torch_dtype(param_dtype))
    return model, raw, optimizer_for(raw, TrainConfig(lr=1e-2), torch.device("cpu"))


def _step(model, optimizer) -> float:
    from trainer.master_weights import MasterWeights

    x = torch.arange(32).reshape(2, 16) % ARGS.vocab_size
    optimizer.zero_grad()
    with torch.autocast("cpu", torch.bfloat16):  # bf16 compute, as train.param_dtype bf16 requires
        loss = model(x, x.roll(-1, 1))[1]
    loss.backward()
    if isinstance(optimizer, MasterWeights):
        optimizer.take_grads()
    optimizer.step()
    return loss.item()


def _full(model, optimizer) -> dict:
    """The checkpoint's view of the state: every tensor whole (the fp32 masters where there are some)."""
    sd = checkpoint.sharded_state(model, optimizer)
    return {"model": {k: _whole(v) for k, v in sd["model"].items()},
            "optimizer": {(k, s): _whole(v) for k, st in sd["optimizer"]["state"].items() for s, v in st.items()}}


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A copy of the whole tensor (a DTensor's gathered: collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _assert_equal(a: dict, b: dict) -> None:
    for part in ("model", "optimizer"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("saved, loaded", [(s, t) for s in parallel.NAMES for t in parallel.NAMES])
def test_every_registered_strategy_resumes_a_checkpoint_of_every_strategy(one_rank_group, tmp_path, saved, loaded,
                                                                            param_dtype):
    """The contract a strategy module meets (docs/architecture.md, "Adding a parallelism strategy"),
    run for every pair of parallel.STRATEGIES: build, train a step, save, build afresh under either
    strategy, load: the weights (fp32 masters where they are bf16) and AdamW's state are those
    saved, keyed alike, and under the same strategy the next step is the same; its memory estimate
    and refusal answer for a plain config."""
    from trainer.config import TrainConfig

    model, raw, optimizer = _built(saved, param_dtype)
    _step(model, optimizer)
    ckpt = tmp_path / "checkpoint_00000001"
    ckpt.mkdir()
    checkpoint.write(ckpt, 0, {"step": 1, "world_size": 1}, 1, sharded=checkpoint.sharded_state(raw, optimizer))
    again, raw_again, optimizer_again = _built(loaded, param_dtype)
    checkpoint.load(ckpt, raw_again, optimizer_again)
    _assert_equal(_full(raw_again, optimizer_again), _full(raw, optimizer))
    assert all(p.dtype == torch.bfloat16 for p in raw_again.parameters()) == (param_dtype == "bf16" and loaded == "ddp")
    if saved == loaded:
        assert _step(again, optimizer_again) == _step(model, optimizer)
        _assert_equal(_full(raw_again, optimizer_again), _full(raw, optimizer))
    strategy = parallel.get(loaded)
    assert sum(vars(strategy.state_bytes(10**6, 10**5, 10**5, world_size=2, weights=parallel.FP32)).values()) > 0
    assert strategy.refusal(TrainConfig(), cudagraphs=False) is None


def test_under_ddp_each_rank_saves_one_share_of_the_parameters_with_their_optimizer_state():
    """Every rank holds the whole state; each copies and writes about 1/world of its bytes, and
    together they write all of it once (a tensor on two ranks would be copied twice)."""
    model, raw, optimizer = _built("ddp", "fp32")
    _step(model, optimizer)
    sd = checkpoint.sharded_state(raw, optimizer)
    shares = [checkpoint.replica_share(sd, rank, 3) for rank in range(3)]
    for part in ("model", "optimizer"):
        whole = sd[part] if part == "model" else sd[part]["state"]
        parts = [s[part] if part == "model" else s[part]["state"] for s in shares]
        assert sorted(k for p in parts for k in p) == sorted(whole)  # each key once
        assert all(p[k] is whole[k] for p in parts for k in p)  # no copy yet
    assert all(set(s["optimizer"]["state"]) <= set(s["model"]) for s in shares)  # a parameter's state beside it
    assert all(s["optimizer"]["param_groups"] == sd["optimizer"]["param_groups"] for s in shares)
    largest = max(checkpoint.tensor_bytes(t) for t in sd["model"].values())
    assert max(checkpoint.tensor_bytes(s["model"]) for s in shares) <= checkpoint.tensor_bytes(sd["model"]) / 3 + largest
    assert checkpoint.replica_share(sd, 0, 1) == sd


def legacy_state(model, optimizer) -> dict:
    """What ddp wrote into state.pt beside the progress before its checkpoints were DCP (the code
    of then): the model's state dict with the fp32 masters in the parameters' places, and the
    optimizer's (the masters' AdamW's) state dict, indexed."""
    from trainer.master_weights import MasterWeights

    if not isinstance(optimizer, MasterWeights):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    master_of = {id(p): m for p, m in zip(optimizer.params, optimizer.masters)}
    return {"model": {name: master_of[id(t)].detach() if id(t) in master_of else t.detach()
                      for name, t in model.state_dict(keep_vars=True).items()},
            "optimizer": optimizer.inner.state_dict()}


@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
def test_a_ddp_checkpoint_of_the_earlier_layout_still_resumes_and_exports(one_rank_group, tmp_path, param_dtype):
    from trainer.save_restore import restore

    model, raw, optimizer = _built("ddp", param_dtype)
    _step(model, optimizer)
    ckpt = tmp_path / "checkpoint_00000001"
    ckpt.mkdir()
    checkpoint.write(ckpt, 0, {"step": 1, "world_size": 1, **legacy_state(raw, optimizer)}, 1)
    assert not checkpoint.is_sharded(ckpt)
    exported = checkpoint.load_model_state_dict(ckpt)
    assert exported.keys() == raw.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in _full(raw, optimizer)["model"].items())

    again, raw_again, optimizer_again = _built("ddp", param_dtype)
    got = restore(tmp_path, None, rank=0, world=1, device=torch.device("cpu"), model=raw_again,
                  optimizer=optimizer_again, strategy="ddp")
    assert got.step == 1
    _assert_equal(_full(raw_again, optimizer_again), _full(raw, optimizer))
    assert _step(again, optimizer_again) == _step(model, optimizer)
    _assert_equal(_full(raw_again, optimizer_again), _full(raw, optimizer))
    fsdp, raw_fsdp, optimizer_fsdp = _built("fsdp", param_dtype)
    with pytest.raises(ValueError, match="earlier layout of scaling.strategy ddp .* resume it with ddp"):
        restore(tmp_path, None, rank=0, world=1, device=torch.device("cpu"), model=raw_fsdp,
                optimizer=optimizer_fsdp, strategy="fsdp")


@pytest.mark.parametrize("change, expected", [({"dim": 64}, "layers.0.attn.wk.weight: (16, 32) in the checkpoint, "
                                                             "(32, 64) in the model"),
                                              ({"n_layers": 3}, "layers.2.attn.wk.weight: absent in the checkpoint"),
                                              ({"n_layers": 1}, "layers.1.attn.wk.weight: (16, 32) in the checkpoint, "
                                                                "absent in the model")],
                         ids=["wider", "deeper", "shallower"])
def test_a_checkpoint_of_another_model_is_a_config_failure_not_a_partial_load(one_rank_group, tmp_path, change,
                                                                               expected):
    """DCP alone loads a larger model's checkpoint into a smaller model without a word."""
    import dataclasses

    from trainer import failures
    from trainer.save_restore import restore

    model, raw, optimizer = _built("ddp", "fp32")
    (tmp_path / "checkpoint_00000001").mkdir()
    checkpoint.write(tmp_path / "checkpoint_00000001", 0, {"step": 1}, sharded=checkpoint.sharded_state(raw, optimizer))
    other = Transformer(dataclasses.replace(ARGS, **change), _attn)
    with pytest.raises(failures.DeterministicFailure, match="does not fit the model of this config") as e:
        restore(tmp_path, None, rank=0, world=1, device=torch.device("cpu"), model=other,
                optimizer=torch.optim.AdamW(other.parameters()), strategy="ddp")
    assert "size mismatch for " in str(e.value) and expected in str(e.value)
