"""The results contract: exit codes by status, and records that refuse unknown fields (the field
tables of docs/results.md are generated from these models: tests/test_docs.py)."""


import pytest

from orchestrator import results


@pytest.mark.parametrize("statuses,status,code", [
    (["succeeded", "succeeded"], "succeeded", 0),
    (["skipped", "succeeded"], "partial", 3),
    (["skipped", "failed"], "failed", 1),
    (["failed", "succeeded"], "failed", 1),
])
def test_exit_code_is_0_only_if_every_requested_variant_succeeded(statuses, status, code):
    variants = {f"v{i}": results.VariantResult(status=s, attention="flash") for i, s in enumerate(statuses)}
    assert results.run_status(variants) == status
    assert results.RunSummary(run=results.RunInfo(name="r", dir="/r", status="interrupted"),
                              variants=variants).settle().run.exit_code == code


def test_a_record_with_an_unknown_field_is_refused_naming_it():
    with pytest.raises(ValueError, match="speed"):
        results.VariantResult(status="succeeded", attention="flash", speed=1.0)
