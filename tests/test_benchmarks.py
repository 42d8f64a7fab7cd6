"""The benchmarks still run and report what they claim (numbers are not asserted: no timing in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, timeout: float = 240) -> dict:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_sim_scale_batched_relays_send_fewer_messages_and_miss_nothing():
    out = bench("benchmarks/sim_scale.py", "--peers", "16", "--edge-probability", "0.4", "--rounds", "1")
    for variant in ("flooded", "batched"):
        assert out[variant]["missed"] == {} and out[variant]["messages_by_type"]["Votes"] > 0
    assert out["batched"]["messages_by_type"]["Votes"] < out["flooded"]["messages_by_type"]["Votes"]
    assert 0 < out["messages_ratio"] < 1


@pytest.mark.skipif(not (Path(os.environ.get("MESHFL_DATA", "/nonexistent")) / "mnist").is_dir(),
                    reason="needs MNIST under $MESHFL_DATA/mnist")
def test_sim_overhead_reports_both_sides():
    out = bench("benchmarks/sim_overhead.py", "--rounds", "1", "--repeats", "1")
    assert out["sim_s"] > 0 and out["bare_s"] > 0
    assert out["ratio"] == pytest.approx(out["sim_s"] / out["bare_s"], rel=0.01)


def test_grpc_overhead_counts_wire_bytes_close_to_the_algorithms():
    out = bench("benchmarks/grpc_overhead.py", "--set", "peers=2", "--set", "rounds=1", "--set", "grpc.base_port=50900")
    assert out["accuracy"]["grpc_dead_peers"] == []
    assert 0.98 <= out["bytes"]["ratio_envelopes"] <= 1.0 <= out["bytes"]["ratio_with_framing"] <= 1.05
    assert len(out["seconds"]["grpc_per_round"]) == 1


def test_failure_cost_a_crash_costs_one_round_at_most_one_detector_timeout():
    out = bench("benchmarks/failure_cost.py", "--runtime", "sim", "--peers", "4", "--rounds", "5",
                "--set", "data.dataset=digits")["sim"]
    assert len(out["failure_free_round_s"]) == 5 and out["rounds_completed_with_crash"] == 5
    assert 0 < out["worst_extra_after_crash_s"] <= out["detector_timeout_s"]
    assert all(extra <= 0.1 * out["failure_free_median_s"] for extra in out["later_rounds_extra_s"])


def test_byzantine_table_writes_the_table_and_the_plot(tmp_path):
    out = bench("benchmarks/byzantine_table.py", "--set", "data.dataset=digits", "--rounds", "2", "--counts", "0,1",
                "--behaviours", "sign_flip", "--rules", "fedavg,median", "--splits", "iid", "--train-samples", "0",
                "-o", str(tmp_path))
    assert out["runs"] == 4 and set(out["honest_accuracy"]) == {
        "iid/fedavg/none/0", "iid/fedavg/sign_flip/1", "iid/median/none/0", "iid/median/sign_flip/1"}
    table = (tmp_path / "table.md").read_text()
    assert "| sign_flip | median |" in table and (tmp_path / "byzantine.png").stat().st_size > 0
    again = bench("benchmarks/byzantine_table.py", "--set", "data.dataset=digits", "--rounds", "2", "--counts", "0,1",
                  "--behaviours", "sign_flip", "--rules", "fedavg,median", "--splits", "iid", "--train-samples", "0",
                  "-o", str(tmp_path))
    assert again["ran_now"] == 0 and again["honest_accuracy"] == out["honest_accuracy"]  # resumed, nothing re-run


@pytest.mark.skipif(not (Path(os.environ.get("MESHFL_DATA", "/nonexistent")) / "mnist").is_dir(),
                    reason="needs MNIST under $MESHFL_DATA/mnist")
def test_sim_scale_gpu_compares_batched_one_by_one_loop_and_bare_vmap():
    out = bench("benchmarks/sim_scale_gpu.py", "--device", "cpu", "--peers", "12", "--rounds", "1", "--degree", "4",
                "--loop-models", "3", "--set", "data.train_samples=1200")
    (run,) = out["runs"]
    batched, alone = run["batched"], run["one_by_one"]
    assert batched["batched_jobs"] == 12 and alone["batched_jobs"] == 0
    assert batched["crashes"] == 0 and batched["peers_reporting"] == 12
    assert batched["train_samples"] == alone["train_samples"] == 12 * 90  # 1,200 samples, 100 a peer, 90 to train
    assert abs(batched["mean_final_accuracy"] - alone["mean_final_accuracy"]) <= 1e-4
    for name in ("torch_loop", "bare_vmap_sim_batch", "bare_vmap_batch_32"):
        assert run[name]["samples_per_s"] > 0
