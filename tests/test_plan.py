"""The planner on canned clusters: GPU or CPU, which nodes, concurrent or sequential, skipped
flash, and infeasible requests. Pure: no Ray."""

import json

import pytest

from orchestrator import labels
from orchestrator.config import ScalingConfig, VariantConfig, validate
from orchestrator.errors import InfeasibleRequest, UsageError
from orchestrator.plan import NodeCapacity, make_plan

FLASH = VariantConfig(name="flash", attention="flash")
STANDARD = VariantConfig(name="standard", attention="standard")
BOTH = [FLASH, STANDARD]


def node(name, cpus=2, gpus=0, flash_ok=True, reason=None, **labels_):
    return NodeCapacity(node_id=name, cpus=cpus, gpus=gpus, labels=labels_, flash_ok=flash_ok,
                        flash_kernel="sdpa_flash_cpu" if flash_ok else None, flash_reason=reason)


def scaling(**kw):
    return ScalingConfig(**{"num_workers": 2, "cpus_per_worker": 1, **kw})


def by_name(plan):
    return {v.name: v for v in plan.variants}


def used(plan):
    """Per node, the CPUs and GPUs the plan's concurrent workers take."""
    out: dict[str, list[float]] = {}
    for v in plan.runnable():
        for n in v.nodes:
            cpu_gpu = out.setdefault(n, [0.0, 0.0])
            cpu_gpu[0] += v.cpus_per_worker
            cpu_gpu[1] += 1 if v.use_gpu else 0
    return out


def test_one_variant_on_a_cpu_node_runs_unpinned_cpu_workers():
    plan = make_plan([FLASH], scaling(), [node("a", cpus=4)])
    v = plan.variants[0]
    assert (plan.mode, v.status, v.use_gpu, v.num_workers, v.label_selector) == ("sequential", "planned", False, 2, None)
    assert v.env == {"ATTN_IMPL": "flash"} and plan.notes == []


def test_standard_workers_get_both_attention_flags():
    v = make_plan([STANDARD], scaling(), [node("a", cpus=4)]).variants[0]
    assert v.env == {"ATTN_IMPL": "standard", "DISABLE_FLASH_ATTN": "1"}


def test_both_variants_fit_on_one_node_so_they_run_concurrently_pinned_to_it():
    plan = make_plan(BOTH, scaling(), [node("a", cpus=4)])
    assert plan.mode == "concurrent" and "concurrently" in plan.notes[0]
    for v in plan.variants:
        assert v.nodes == ["a", "a"]
        assert v.label_selector == [{"ray.io/node-id": "a"}] * 2


def test_both_variants_do_not_fit_at_once_so_they_run_one_after_the_other_said_up_front():
    plan = make_plan(BOTH, scaling(), [node("a", cpus=3)])
    assert plan.mode == "sequential"
    assert "cannot hold all 2 variants at once" in plan.notes[0] and "one after the other" in plan.notes[0]
    assert all(v.status == "planned" and v.label_selector is None for v in plan.variants)


def test_flash_goes_only_to_flash_capable_nodes_and_standard_takes_the_rest():
    nodes = [node("a", flash_ok=False, reason="no fused kernel"), node("b")]
    plan = make_plan(BOTH, scaling(), nodes)
    v = by_name(plan)
    assert plan.mode == "concurrent"
    assert v["flash"].nodes == ["b", "b"] and v["standard"].nodes == ["a", "a"]
    assert v["flash"].label_selector == [{"ray.io/node-id": "b"}] * 2


def test_the_most_constrained_variant_is_placed_first_whatever_the_listed_order():
    """Standard listed first could take the only flash-capable node; the planner must not let it."""
    nodes = [node("flashy"), node("plain", flash_ok=False, reason="x")]
    plan = make_plan([STANDARD, FLASH], scaling(), nodes)
    v = by_name(plan)
    assert plan.mode == "concurrent"
    assert v["flash"].nodes == ["flashy", "flashy"] and v["standard"].nodes == ["plain", "plain"]


def test_concurrent_variants_never_share_a_cpu_or_gpu():
    nodes = [node("a", cpus=3, gpus=1), node("b", cpus=3, gpus=3), node("c", cpus=1, gpus=0)]
    variants = [FLASH, STANDARD, VariantConfig(name="flash-2", attention="flash")]
    plan = make_plan(variants, scaling(use_gpu=True, num_workers=1), nodes)
    assert plan.mode == "concurrent"
    caps = {n.node_id: (n.cpus, n.gpus) for n in nodes}
    for n, (cpu, gpu) in used(plan).items():
        assert cpu <= caps[n][0] and gpu <= caps[n][1]


def test_gpu_auto_takes_gpus_when_every_worker_gets_one_each_variant_on_its_own():
    nodes = [node("g1", cpus=8, gpus=2), node("g2", cpus=8, gpus=2)]
    plan = make_plan(BOTH, scaling(), nodes)
    v = by_name(plan)
    assert plan.mode == "concurrent" and v["flash"].use_gpu and v["standard"].use_gpu
    assert {tuple(v["flash"].nodes), tuple(v["standard"].nodes)} == {("g1", "g1"), ("g2", "g2")}


def test_gpu_auto_falls_back_to_cpu_when_there_are_fewer_gpus_than_workers():
    plan = make_plan([FLASH], scaling(), [node("g", cpus=8, gpus=1)])
    assert plan.variants[0].use_gpu is False


def test_gpu_auto_with_room_for_one_variant_on_gpus_runs_them_sequentially_on_gpus():
    plan = make_plan(BOTH, scaling(), [node("g", cpus=8, gpus=2)])
    assert plan.mode == "sequential" and all(v.use_gpu for v in plan.variants)


def test_use_gpu_false_keeps_cpu_workers_on_a_gpu_cluster():
    plan = make_plan([FLASH], scaling(use_gpu=False), [node("g", cpus=8, gpus=8)])
    assert plan.variants[0].use_gpu is False


def test_flash_that_works_nowhere_is_skipped_with_preflight_reasons_and_standard_still_runs():
    nodes = [node("node-one", flash_ok=False, reason="flash_attn: undefined symbol _ZN3c10"),
             node("node-two", flash_ok=False, reason="SDPA fused kernel mismatch")]
    plan = make_plan(BOTH, scaling(), nodes)
    v = by_name(plan)
    assert v["flash"].status == "skipped"
    assert "undefined symbol _ZN3c10" in v["flash"].reason and "SDPA fused kernel mismatch" in v["flash"].reason
    assert v["standard"].status == "planned" and [x.name for x in plan.runnable()] == ["standard"]
    assert any("flash is skipped" in n for n in plan.notes)
    assert "skipped" in "\n".join(plan.describe())


def test_sequential_flash_is_restricted_to_flash_capable_nodes_by_node_id():
    nodes = [node("a"), node("b"), node("c", flash_ok=False, reason="x")]
    plan = make_plan(BOTH, scaling(num_workers=4), nodes)
    v = by_name(plan)
    assert plan.mode == "sequential"
    assert v["flash"].label_selector == {"ray.io/node-id": "in(a,b)"}
    assert v["standard"].label_selector is None


def test_more_workers_than_the_cluster_has_is_infeasible_naming_the_numbers():
    with pytest.raises(InfeasibleRequest, match=r"variant flash: 5 worker\(s\) x \(1 CPU\) do not fit .*4 CPU"):
        make_plan([FLASH], scaling(num_workers=5), [node("a"), node("b")])


def test_gpus_requested_on_a_cpu_cluster_is_infeasible():
    with pytest.raises(InfeasibleRequest, match=r"\(1 CPU \+ 1 GPU\) do not fit .*0 GPU"):
        make_plan([FLASH], scaling(use_gpu=True), [node("a", cpus=16)])


def test_workers_that_fit_the_total_but_not_any_split_over_nodes_are_infeasible():
    """3 CPUs free in all, but a 1.5-CPU worker fits only once per 2-CPU node... twice would need 3 on one."""
    with pytest.raises(InfeasibleRequest):
        make_plan([FLASH], scaling(num_workers=2, cpus_per_worker=1.5), [node("a", cpus=2), node("b", cpus=1)])


def test_flash_workers_beyond_the_flash_capable_nodes_are_infeasible():
    nodes = [node("a"), node("b", cpus=8, flash_ok=False, reason="x")]
    with pytest.raises(InfeasibleRequest, match="the 1 flash-capable node"):
        make_plan([FLASH], scaling(num_workers=3), nodes)


def test_a_selector_matching_no_node_is_infeasible_and_named():
    with pytest.raises(InfeasibleRequest, match=r"label selector \{gpu-type=H100\} matches none of the cluster's 2"):
        make_plan([FLASH], scaling(label_selector={"gpu-type": "H100"}), [node("a", **{"gpu-type": "A10"}), node("b")])


def test_infeasible_requests_are_usage_errors_with_exit_code_2():
    with pytest.raises(UsageError) as e:
        make_plan([FLASH], scaling(num_workers=9), [node("a")])
    assert e.value.exit_code == 2


def test_an_empty_cluster_is_infeasible():
    with pytest.raises(InfeasibleRequest, match="no alive nodes"):
        make_plan([FLASH], scaling(), [])


def test_scaling_and_variant_selectors_combine():
    nodes = [node("a", zone="x", tier="fast"), node("b", zone="x", tier="slow"), node("c", zone="y", tier="fast")]
    cfg = validate({"scaling": {"num_workers": 1, "label_selector": {"zone": "x"}},
                    "variants": [{"name": "fast", "attention": "flash", "label_selector": {"tier": "fast"}},
                                 {"name": "slow", "attention": "standard", "label_selector": {"tier": "!fast"}}]})
    plan = make_plan(cfg.variants, cfg.scaling, nodes)
    v = by_name(plan)
    assert v["fast"].nodes == ["a"] and v["slow"].nodes == ["b"]


def test_the_plan_is_json_and_says_where_each_variant_runs():
    plan = make_plan(BOTH, scaling(), [node("a" * 56, cpus=4)])
    data = json.loads(json.dumps(plan.to_json()))
    assert data["mode"] == "concurrent" and data["cluster"][0]["node_id"] == "a" * 56
    assert [v["name"] for v in data["variants"]] == ["flash", "standard"]
    text = "\n".join(plan.describe())
    assert "flash: planned, 2 x CPU worker(s) on aaaaaaaaaaaa (2), ATTN_IMPL=flash" in text


@pytest.mark.parametrize("selector,node_labels,expected", [
    ({"zone": "x"}, {"zone": "x"}, True),
    ({"zone": "x"}, {"zone": "y"}, False),
    ({"zone": "x"}, {}, False),
    ({"zone": "!x"}, {"zone": "y"}, True),
    ({"zone": "!x"}, {}, True),
    ({"zone": "!x"}, {"zone": "x"}, False),
    ({"zone": "in(x, y)"}, {"zone": "y"}, True),
    ({"zone": "in(x,y)"}, {"zone": "z"}, False),
    ({"zone": "!in(x,y)"}, {"zone": "z"}, True),
    ({"zone": "!in(x,y)"}, {"zone": "x"}, False),
    ({"zone": "x", "tier": "fast"}, {"zone": "x", "tier": "slow"}, False),
    ({}, {"zone": "x"}, True),
])
def test_label_selectors_match_like_ray(selector, node_labels, expected):
    assert labels.matches(selector, node_labels) is expected


def test_a_selector_for_several_nodes_uses_rays_in_syntax():
    assert labels.one_of("ray.io/node-id", ["a", "b", "a"]) == {"ray.io/node-id": "in(a,b)"}
    assert labels.one_of("ray.io/node-id", ["a"]) == {"ray.io/node-id": "a"}


@pytest.mark.parametrize("selector,message", [
    ({"zone": "in(x,"}, "label selector value 'in(x,'"),
    ({"-bad": "x"}, "label key '-bad'"),
])
def test_bad_label_selectors_are_config_errors(selector, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        validate({"scaling": {"label_selector": selector}}, "c.yaml")


def test_a_lone_flash_variant_that_works_nowhere_trains_with_standard_attention_and_says_why():
    """The single-machine promise on a cluster: detect, disable, log why, still train."""
    nodes = [node("a", cpus=4, flash_ok=False, reason="GLIBC too old: flash_attn needs GLIBC_2.32, node has 2.31")]
    v = make_plan([FLASH], scaling(), nodes).variants[0]
    assert v.status == "planned" and v.attention == "flash"
    assert v.env == {"ATTN_IMPL": "standard", "DISABLE_FLASH_ATTN": "1"}
    assert "GLIBC too old" in v.reason and v.reason.startswith("standard attention")


def test_disabling_flash_gives_every_variant_standard_attention_on_the_same_placement():
    """--run-both-models --disable-flash-attn: the same two runs side by side, both standard."""
    nodes = [node("a", gpus=2, cpus=8), node("b", gpus=2, cpus=8, flash_ok=False, reason="GPU too old")]
    plain, off = make_plan(BOTH, scaling(), nodes), make_plan(BOTH, scaling(), nodes, flash_disabled=True)
    assert off.mode == plain.mode == "concurrent"
    assert [(v.name, v.attention, v.use_gpu, v.status) for v in off.variants] == [
        ("flash", "flash", True, "planned"), ("standard", "standard", True, "planned")]
    for v in off.variants:
        assert v.env == {"ATTN_IMPL": "standard", "DISABLE_FLASH_ATTN": "1"}
        assert v.reason == "flash attention disabled (--disable-flash-attn or DISABLE_FLASH_ATTN=1)"
    assert off.flash_disabled == v.reason and plain.flash_disabled is None
    # Without the switch flash may only use node a; with it, no variant is kept off node b.
    assert set(plain.variants[0].nodes) == {"a"}
    assert sorted(off.variants[0].nodes + off.variants[1].nodes) == ["a", "a", "b", "b"]


def test_the_default_num_workers_trains_on_the_one_gpu_found_and_says_why():
    plan = make_plan([FLASH], ScalingConfig(), [node("g", cpus=16, gpus=1)])
    v = plan.variants[0]
    assert (v.num_workers, v.use_gpu, v.nodes) == (1, True, ["g"])
    text = "\n".join(plan.describe())
    assert "flash: planned, 1 x GPU worker(s) on g (1)" in text
    assert "workers: scaling.num_workers auto, 1 GPU found" in text


def test_the_default_num_workers_takes_all_eight_gpus_of_a_node():
    v = make_plan([FLASH], ScalingConfig(), [node("g", cpus=32, gpus=8)]).variants[0]
    assert (v.num_workers, v.use_gpu) == (8, True)


def test_the_default_num_workers_on_a_cpu_machine_is_two_cpu_workers_as_before():
    plan = make_plan(BOTH, ScalingConfig(), [node("a", cpus=4)])
    assert plan.mode == "concurrent"
    assert [(v.num_workers, v.use_gpu) for v in plan.variants] == [(2, False), (2, False)]
    assert "workers: scaling.num_workers auto, no GPU found" in "\n".join(plan.describe())


def test_two_default_variants_on_one_gpu_each_train_on_it_one_after_the_other():
    plan = make_plan(BOTH, ScalingConfig(), [node("g", cpus=16, gpus=1)])
    assert plan.mode == "sequential"
    assert [(v.num_workers, v.use_gpu) for v in plan.variants] == [(1, True), (1, True)]


def test_an_explicit_two_workers_beside_one_gpu_stay_on_cpu_and_the_plan_says_why():
    plan = make_plan([FLASH], scaling(num_workers=2), [node("g", cpus=16, gpus=1)])
    v = plan.variants[0]
    assert (v.num_workers, v.use_gpu) == (2, False)
    assert ("workers: scaling.use_gpu auto: 2 GPU worker(s) do not fit the 1 GPU(s) found, so CPU workers"
            in "\n".join(plan.describe()))
    with pytest.raises(InfeasibleRequest, match="do not fit"):
        make_plan([FLASH], scaling(num_workers=2, use_gpu=True), [node("g", cpus=16, gpus=1)])


def test_the_default_num_workers_is_recorded_resolved_in_the_plan_json():
    data = json.loads(json.dumps(make_plan([FLASH], ScalingConfig(), [node("g", cpus=16, gpus=2)]).to_json()))
    assert data["variants"][0]["num_workers"] == 2 and data["variants"][0]["use_gpu"] is True
