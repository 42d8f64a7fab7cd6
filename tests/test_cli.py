import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from meshfl.cli import app
from meshfl.config import ConfigError, describe_fields, load_config

runner = CliRunner()


@pytest.mark.parametrize(("override", "expected"), [
    ("peers=0", "peers: Input should be greater than or equal to 1 (got 0)"),
    ("train.model=resnet", "train.model: must be mlp, cnn or lenet5 or a factory `package.module:factory` returning a torch.nn.Module (got 'resnet')"),
    ("topology.kind=torus", "topology.kind: must be one of"),
    ("gossip.fanout=2", "gossip.fanout: is not a known field"),
    ("data.min_samples=900", "data.min_samples must be <= data.max_samples"),
    ("gossip.initiator=9", "gossip.initiator must be < peers (8)"),
    ("grpc.tls.mode=mtls", "grpc.tls.mode=mtls needs grpc.tls.ca, grpc.tls.cert, grpc.tls.key"),
    ("peers", "--set 'peers': expected key=value"),
])
def test_bad_values_give_one_line_naming_the_field(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_set_indexes_into_lists(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("peers: 6\n"
                      "faults:\n  - {kind: crash, count: 1, at_round: 1}\n  - {kind: loss, probability: 0.1, at_s: 1}\n"
                      "network:\n  links:\n    - {peers: [0, 1], bandwidth_mbps: 10}\n    - {peers: [1, 2], bandwidth_mbps: 10}\n")
    loaded = load_config(config, ["faults.0.count=4", "network.links.1.bandwidth_mbps=5", "network.links.0.peers.1=3",
                                  "network.peers.3.latency_s=0.2"])  # a number under a mapping stays a key
    assert loaded.faults[0].count == 4 and loaded.faults[1].probability == 0.1
    assert loaded.network.links[1].bandwidth_mbps == 5 and loaded.network.links[0].bandwidth_mbps == 10
    assert loaded.network.links[0].peers == (0, 3) and loaded.network.peers[3].latency_s == 0.2
    assert load_config(config, ["faults.1={kind: crash, peers: [2], at_s: 3}"]).faults[1].peers == [2]


@pytest.mark.parametrize(("override", "expected"), [
    ("faults.2.count=1", "faults.2.count: index 2 is out of range (faults has items 0..1)"),
    ("network.links.7.loss=0.1", "network.links.7.loss: index 7 is out of range (network.links has items 0..1)"),
    ("faults.x.count=1", "faults.x.count: faults is a list; index it with a number"),
    ("faults.0.count.x=1", "faults.0.count.x: faults.0.count is not a list or section (it is 1)"),
    ("peers.1=2", "peers.1: peers is not a list or section (it is 6)"),
])
def test_set_list_index_errors_name_the_key(tmp_path, override, expected):
    config = tmp_path / "c.yaml"
    config.write_text("peers: 6\nfaults:\n  - {kind: crash, count: 1, at_round: 1}\n  - {kind: crash, peers: [1], at_s: 1}\n"
                      "network:\n  links:\n    - {peers: [0, 1]}\n    - {peers: [1, 2]}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config, [override])
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_set_index_into_a_list_the_yaml_does_not_give_is_out_of_range():
    with pytest.raises(ConfigError, match=r"^faults\.0\.count: index 0 is out of range \(faults has no items\)$"):
        load_config(None, ["faults.0.count=1"])


def test_bad_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("peers: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_bad_value_exits_2_without_traceback():
    done = subprocess.run([sys.executable, "-m", "meshfl.cli", "run", "--set", "rounds=-1"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "rounds" in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1


def test_every_field_has_a_description_and_config_command_shows_them():
    fields = describe_fields()
    assert all(description for _, _, description in fields)
    result = runner.invoke(app, ["config"], terminal_width=250)
    assert result.exit_code == 0
    for name in ("gossip.gossip_fanout", "data.dirichlet_alpha", "network.bandwidth_mbps"):
        assert name in result.stdout
    assert "gossip.gossip_fanout" in runner.invoke(app, ["run", "--help"], terminal_width=250).stdout


def test_run_writes_the_run_folder(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--set", "peers=3", "--set", "rounds=2", "--set", "train.local_epochs=1",
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "partition.json", "accuracy_per_peer.png", "report.html"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["final_global_accuracy"]) == ["0", "1", "2"] and summary["total_messages"] > 0
    assert load_config(out / "config.yaml").peers == 3  # the resolved config loads back
    partition = json.loads((out / "partition.json").read_text())
    assert sum(p["train_samples"] + p["test_samples"] for p in partition) > 1000


def _one_line_error(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_out_into_a_non_empty_folder_or_a_file_is_refused_up_front(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    for command in ("run", "launch"):
        extra = ["--local"] if command == "launch" else []
        done = subprocess.run([sys.executable, "-m", "meshfl.cli", command, *extra, "--out", str(full), "--quiet"],
                              capture_output=True, text=True, timeout=60)
        _one_line_error(done, "not empty")
        assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    done = subprocess.run([sys.executable, "-m", "meshfl.cli", "run", "--out", str(full / "keep.txt")],
                          capture_output=True, text=True, timeout=60)
    _one_line_error(done, "is a file")
    assert (full / "keep.txt").read_text() == "mine"


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, "-m", "meshfl.cli", "run", "--set", "train.device=cuda", "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    _one_line_error(done, "train.device=cuda")
    assert not (tmp_path / "run").exists()


def test_ctrl_c_of_run_writes_an_interrupted_run_folder(tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "meshfl.cli", "run", "--quiet", "--out", str(run),
                             "--set", "rounds=2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not run.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(3.0)  # data loaded, some rounds simulated
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and str(run) in stderr.replace("\n", "")
    summary = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["interrupted"] is True
    assert "(interrupted)" in (run / "report.html").read_text()
