"""examples/reproduce.py: several seeds of a tiny recipe, a table of their test errors."""
import importlib.util
import json
import statistics

from tests.examples.flag_help import assert_every_flag_documented
from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("reproduce", REPO / "examples" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_two_seeds_make_a_table(mnist_root, tmp_path):
    tiny = ["--conv-channels", "8", "--primary-caps", "2", "--backend", "torch", "--batch-size", "32",
            "--train-subset", "128", "--test-subset", "100", "--device", "cpu", "--threads", "1",
            "--data-dir", str(mnist_root)]
    report = reproduce.main(["--seeds", "0", "1", "--epochs", "1", "--results", str(tmp_path / "results"),
                             "--runs-dir", str(tmp_path / "runs"), "--tag", "tiny", "--", *tiny])
    errors = [100 * (1 - r["test_accuracy"]) for r in report["runs"]]
    assert len(errors) == 2 and errors[0] != errors[1]  # the seeds differ
    summary = report["summary"]["test_error_percent"]
    assert summary["mean"] == statistics.fmean(errors) and summary["best"] == min(errors)
    assert summary["std"] == statistics.stdev(errors)
    saved = json.loads((tmp_path / "results" / "tiny.json").read_text())
    assert saved["config"]["epochs"] == 1 and saved["config"]["time_budget"] is None
    assert saved["machine"]["torch"] and saved["machine"]["card"]
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert f"{summary['mean']:.2f} ± {summary['std']:.2f}" in table and table.count("\n| 1 |") == 1


def test_every_flag_has_help_with_its_default():
    text = " ".join(assert_every_flag_documented(reproduce.build_parser()).split())
    assert "relative to the working directory" in text and "(default: [0, 1, 2])" in text
