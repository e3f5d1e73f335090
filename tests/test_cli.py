"""Command-line conventions: --version, a closed pipe, a failed start leaving nothing."""
import subprocess
import sys

import dance
from dance.cli import main
from dance.data.scoring import ScoreRow, write_scores_csv


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"dance {dance.__version__}"


def test_a_closed_pipe_ends_quietly(tmp_path):
    csv = tmp_path / "s.csv"
    write_scores_csv([ScoreRow(f"im{i}", f"im{i}.png", "si", float(i)) for i in range(200)], csv)
    proc = subprocess.Popen([sys.executable, "-m", "dance", "plan", "--scores", str(csv),
                             "--budget", "0.5", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_a_failed_start_leaves_no_empty_run_folder(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {{root: {tmp_path / 'nothing here'}}}\n")
    rc = main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert rc == 1 and "nothing here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made stays
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "kept")]) == 1
    assert (tmp_path / "kept").is_dir()
