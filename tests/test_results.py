"""The results contract: exit codes by status, and the README's field tables against the models."""


import pytest

from orchestrator import results
from tests.conftest import ROOT


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


@pytest.mark.parametrize("model", [results.RunInfo, results.VariantResult], ids=lambda m: m.__name__)
def test_the_readme_field_table_lists_every_field_of_the_summary_as_described_in_the_code(model):
    readme = (ROOT / "README.md").read_text()
    table = results.field_table(model)
    assert "\n".join(table) in readme, (f"README.md's table of {model.__name__} fields is out of step with "
                                        f"orchestrator/results.py; it should read:\n" + "\n".join(table))


def test_a_record_with_an_unknown_field_is_refused_naming_it():
    with pytest.raises(ValueError, match="speed"):
        results.VariantResult(status="succeeded", attention="flash", speed=1.0)
