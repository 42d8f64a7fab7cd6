"""What does meshfl itself cost? The MNIST gossip experiment against a bare PyTorch loop.

Both sides, in one process, do the same work: every peer takes the same SGD steps (same
model, batch size, samples and batch order) from the round's model, the models are
averaged (FedAvg), and every peer evaluates on its local test split and the global test
set. The bare loop has no peers, messages, clock or metrics. Prints JSON:
{"sim_s": ..., "bare_s": ..., "ratio": ...}.

    MESHFL_DATA=../shared/data python benchmarks/sim_overhead.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from meshfl.config import load_config
from meshfl.core.seeds import batch_generator
from meshfl.data import load_dataset, split_for_peers
from meshfl.experiment.run import simulate
from meshfl.learn.learner import batch_indices, steps_per_round
from meshfl.learn.models import build_model

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist_gossip.yaml"


def timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): CPU time is the steadier one on a busy machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def bare_loop(config) -> None:
    """FedAvg rounds written directly in PyTorch."""
    train, test = load_dataset(config.data, config.seed)
    peers = split_for_peers(train, config.peers, config.data, config.seed)
    torch.manual_seed(0)
    model = build_model(config.train.model, train.feature_shape, train.num_classes)
    generators = [batch_generator(config.seed, p) for p in range(config.peers)]
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for _round in range(config.rounds):
        states, weights = [], []
        for p, data in enumerate(peers):
            model.load_state_dict(global_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=config.train.learning_rate)
            model.train()
            steps = steps_per_round(config.train, len(data.train))
            for idx in batch_indices(len(data.train), steps, config.train.batch_size, generators[p]):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
                optimizer.step()
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(data.train))
        total = sum(weights)
        global_state = {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total for k in global_state}
        model.load_state_dict(global_state)
        model.eval()
        with torch.no_grad():
            for data in peers:
                for split in (data.test, test):
                    for start in range(0, len(split), 4096):
                        logits = model(split.x[start:start + 4096])
                        F.cross_entropy(logits, split.y[start:start + 4096], reduction="sum")
                        (logits.argmax(1) == split.y[start:start + 4096]).sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=EXAMPLE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="alternate runs; the fastest of each side counts")
    args = parser.parse_args()
    config = load_config(args.config, [f"rounds={args.rounds}"])
    load_dataset(config.data, config.seed)  # warm the file cache for both sides
    sim, bare = [], []
    for _ in range(args.repeats):
        bare.append(timed(lambda: bare_loop(config)))
        sim.append(timed(lambda: simulate(config)))
    sim_s, bare_s = min(w for w, _ in sim), min(w for w, _ in bare)
    sim_cpu, bare_cpu = min(c for _, c in sim), min(c for _, c in bare)
    print(json.dumps({"sim_s": round(sim_s, 3), "bare_s": round(bare_s, 3), "ratio": round(sim_s / bare_s, 3),
                      "sim_cpu_s": round(sim_cpu, 3), "bare_cpu_s": round(bare_cpu, 3), "cpu_ratio": round(sim_cpu / bare_cpu, 3),
                      "rounds": args.rounds, "peers": config.peers, "threads": torch.get_num_threads(),
                      "sim_runs_s": [round(w, 3) for w, _ in sim], "bare_runs_s": [round(w, 3) for w, _ in bare]}))


if __name__ == "__main__":
    main()
