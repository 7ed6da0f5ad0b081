"""Checks of the five-cluster toy (experiments/clusters/): a short run and its command line."""

from __future__ import annotations

import pytest

from experiments.clusters import main
from experiments.clusters.train import train_and_evaluate


def test_five_clusters_writes_plot_and_adam_beats_the_tutorial_recipe(tmp_path):
    report = train_and_evaluate(tmp_path, n_per_cluster=60, epochs=300)
    tutorial, good = report["test_accuracy"].values()
    assert good > tutorial and good > 0.85
    assert (tmp_path / "decision_boundary.png").stat().st_size > 0
    assert (tmp_path / "metrics.json").stat().st_size > 0


def test_five_clusters_command_line_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        main.main(["--help"])
    assert info.value.code == 0
    assert "--points-per-cluster" in capsys.readouterr().out
