"""The shipped examples reach what the README promises (MNIST from ../shared/data or $MESHFL_DATA)."""

import os
from pathlib import Path

import pytest

from meshfl.config import load_config
from meshfl.experiment.run import run_experiment

ROOT = Path(__file__).resolve().parent.parent
MNIST = Path(os.environ.get("MESHFL_DATA", ROOT.parent / "shared" / "data")) / "mnist"


@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="MNIST not available")
def test_mnist_gossip_example_every_peer_reaches_097(tmp_path):
    config = load_config(ROOT / "examples" / "mnist_gossip.yaml", [f"data.path={MNIST}"])
    result = run_experiment(config, tmp_path / "run")
    final = result.summary["final_global_accuracy"]
    assert len(final) == 10
    assert min(final.values()) >= 0.97, final
    assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="MNIST not available")
def test_mnist_gossip_faults_example_survives_a_crash_a_restart_and_loss(tmp_path):
    config = load_config(ROOT / "examples" / "mnist_gossip_faults.yaml", [f"data.path={MNIST}"])
    result = run_experiment(config, tmp_path / "run")
    summary = result.summary
    assert summary["dead_peers"] == [] and summary["incarnations"]["3"] == 2 and summary["crashes"]["3"] == 1
    others = {p: a for p, a in summary["final_global_accuracy"].items() if p != "3"}
    assert min(others.values()) >= 0.97, others
    fired = [e["kind"] for e in result.metrics.events if e["event"] == "fault"]
    assert fired == ["crash", "restart", "set_loss", "clear_loss"]
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Crashes / restarts" in report
