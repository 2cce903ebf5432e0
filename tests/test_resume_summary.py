"""What `--resume` and the closing summary say about runs with nothing (left) to train."""

import json
from dataclasses import asdict

import yaml

from orchestrator import config
from orchestrator.results import RunSummary, VariantResult
from orchestrator.run import TrainOptions, train


def test_resuming_a_run_interrupted_after_its_last_variant_settles_its_status(tmp_path):
    """Interrupted after every variant succeeded: --resume trains nothing, starts no Ray, and
    the summary gets a real status and exit code instead of 'interrupted'."""
    run_dir = tmp_path / "runs" / "done"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.RunConfig().model_dump(mode="json")))
    opts = TrainOptions(output_dir=str(tmp_path / "runs"), name="done")
    (run_dir / "options.json").write_text(json.dumps(asdict(opts)))
    record = {"status": "succeeded", "attention": "flash", "backend": "sdpa_flash_cpu", "steps": 100,
              "first_loss": 7.6, "final_loss": 5.0, "tokens_per_s": 6000.0, "peak_mem_bytes": 1, "restarts": 0}
    (run_dir / "summary.json").write_text(json.dumps(
        {"run": {"name": "done", "dir": str(run_dir), "status": "interrupted"}, "variants": {"flash": record}}))
    summary = train(TrainOptions(resume=str(run_dir)))
    assert (summary.run.status, summary.run.exit_code) == ("succeeded", 0)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["run"]["status"] == "succeeded"
    assert on_disk["variants"]["flash"] == VariantResult(**record).model_dump(mode="json")


def test_summary_of_a_variant_with_no_timed_steps_prints_n_a_instead_of_crashing():
    summary = RunSummary.model_validate({"run": {"name": "x", "dir": "/runs/x", "status": "succeeded"}, "variants": {"flash": {
        "status": "succeeded", "backend": "sdpa_flash_cpu", "steps": 100, "first_loss": 7.6, "final_loss": None,
        "tokens_per_s": None, "peak_mem_bytes": None, "restarts": 0, "attention": "flash"}}})
    line = summary.describe()[0]
    assert "loss 7.600 -> n/a, n/a tok/s, peak mem n/a" in line
