"""The README's first line, end to end (3-4 minutes on 2 cores: `pytest -m slow` runs it)."""
import json

import pytest

from dance.cli import main


@pytest.mark.slow
def test_demo_runs_to_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| dance |" in table and "demo finished" in table
    report = json.loads((out / "report.json").read_text())
    # lowres: the plain model evaluated at DANCE's inference FLOPs
    assert set(report["runs"]) == {"baseline", "short", "uniform", "dance", "lowres"}
    assert report["ratios"]["dance"]["train_gflops"] <= 0.52
    assert report["ratios"]["dance"]["infer_gflops"] <= 0.525  # network_budget 0.5, +-5%
    assert report["runs"]["dance"]["removed_channels"] > 0
    assert len(list(out.glob("*.png"))) >= 3 and (out / "report.md").is_file()
    # a second call reuses the data and the finished runs
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
