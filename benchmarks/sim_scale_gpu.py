"""Thousands of simulated peers at the speed of the hardware: batched vs one-by-one training.

For each K in --peers, in one process and on one device:

- `batched`: a simulated run of K peers x MNIST MLP (784-256-128-10), batch 32, one local epoch
  per round, D-PSGD neighbour averaging (`algorithm=dpsgd`) on a random 8-regular graph, --rounds
  rounds, `compute.batching=on`: wall s, s/round, training samples/s inside the simulator (samples
  trained / wall time of the training flushes), evaluation s, peak memory, final accuracy.
- `one_by_one`: the same run with `compute.batching=off` (each request alone with TorchLearner),
  for K <= --max-one-by-one.
- `torch_loop`: a plain PyTorch loop (nn.Module + torch.optim.SGD, zero_grad/backward/step) training
  the same peers' shards one after another, one epoch each, on the same device; on the first
  --loop-models peers only (a rate: samples/s).
- `bare_vmap`: the vmapped gradient + SGD step alone, K stacked models with data already on the
  device, at the simulator's batch per model (min(32, samples per peer)) and at 32: the ceiling.

`--default-run` adds the README's `meshfl run --set peers=100` on digits and on MNIST (gossip, the
embedded default), batched vs one by one. Prints JSON.

    python benchmarks/sim_scale_gpu.py --device cpu --peers 100 --rounds 2 --default-run
    python benchmarks/sim_scale_gpu.py --device cuda --peers 100 1000 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F

from meshfl.config import load_config
from meshfl.data import load_dataset, split_for_peers
from meshfl.experiment.run import simulate
from meshfl.learn.batched import BatchedTrainer
from meshfl.learn.learner import batch_indices, resolve_device
from meshfl.learn.models import build_model
from meshfl.runtime.sim.runtime import Simulation


def scale_overrides(peers: int, rounds: int, device: str, degree: int) -> list[str]:
    return [f"peers={peers}", f"rounds={rounds}", "algorithm=dpsgd", "data.dataset=mnist", "data.partition=iid",
            "topology.kind=regular", f"topology.degree={min(degree, peers - 1 - (peers * min(degree, peers - 1)) % 2)}",
            "train.model=mlp", "train.batch_size=32", "train.local_epochs=1", "train.learning_rate=0.05",
            f"train.device={device}", "liveness.watch=overlay", f"max_virtual_time_s={1e9}"]


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def simulated(overrides: list[str], batching: str) -> dict:
    config = load_config(None, [*overrides, f"compute.batching={batching}"])
    sims: list[Simulation] = []
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result, metrics, _ = simulate(config, on_simulation=sims.append)
    wall = time.perf_counter() - started
    queue = sims[0].compute
    finals = [e["value"] for e in metrics.events if e.get("metric") == "global_accuracy" and e.get("round") == config.rounds]
    out = {"wall_s": round(wall, 3), "s_per_round": round(wall / config.rounds, 3),
           "train_s": round(queue.train_seconds, 3), "evaluate_s": round(queue.evaluate_seconds, 3),
           "train_samples": queue.train_samples,
           "train_samples_per_s": round(queue.train_samples / queue.train_seconds) if queue.train_seconds else None,
           "batched_jobs": queue.batched_jobs, "flushes": queue.flushes,
           "mean_final_accuracy": round(sum(finals) / len(finals), 4) if finals else None,
           "peers_reporting": len(finals), "messages": sum(result.traffic.messages_sent),
           "crashes": sum(1 for e in metrics.events if e["event"] == "peer_crashed"),
           "first_error": next((e.get("error") for e in metrics.events if e.get("error")), None),
           "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def torch_loop(overrides: list[str], models: int) -> dict:
    """The same peers' shards trained one after another by a plain PyTorch loop (one epoch each)."""
    config = load_config(None, overrides)
    device = resolve_device(config.train.device)
    train, _ = load_dataset(config.data, config.seed)
    shards = split_for_peers(train, config.peers, config.data, config.seed)[:models]
    module = build_model("mlp", train.feature_shape, train.num_classes).to(device)
    start = torch.nn.utils.parameters_to_vector(module.parameters()).detach().clone()
    data = [(s.train.x.to(device), s.train.y.to(device)) for s in shards]
    generator = torch.Generator().manual_seed(0)
    samples = 0
    _sync(device)
    began = time.perf_counter()
    for x, y in data:
        torch.nn.utils.vector_to_parameters(start, module.parameters())
        optimizer = torch.optim.SGD(module.parameters(), lr=config.train.learning_rate)
        for idx in batch_indices(len(x), -(-len(x) // config.train.batch_size), config.train.batch_size, generator):
            idx = idx.to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(x[idx]), y[idx]).backward()
            optimizer.step()
            samples += len(idx)
    _sync(device)
    seconds = time.perf_counter() - began
    return {"models": len(data), "samples": samples, "samples_per_s": round(samples / seconds)}


def bare_vmap(overrides: list[str], batch: int, steps: int = 5) -> dict:
    """The vmapped step of K stacked models on fixed, device-resident full batches: the ceiling."""
    config = load_config(None, overrides)
    trainer = BatchedTrainer(config.train, (1, 28, 28), 10)
    k, device = config.peers, trainer.device
    g = torch.Generator().manual_seed(0)
    init = torch.nn.utils.parameters_to_vector(build_model("mlp", (1, 28, 28), 10).parameters()).detach()
    out: dict = {"batch": batch, "models_per_chunk": trainer.models_per_chunk}
    done = 0
    params = init.to(device).expand(k, -1).contiguous()
    chunk = trainer.models_per_chunk
    chunks = [(first, min(chunk, k - first)) for first in range(0, k, chunk)]  # the chunks train_many would use
    updates = [trainer._state(params[first:first + n]) for first, n in chunks]
    x = torch.rand(chunks[0][1], batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (chunks[0][1], batch), generator=g).to(device)
    mask = torch.ones(chunks[0][1], batch, device=device)
    count = torch.full((chunks[0][1],), float(batch), device=device)
    for t in range(steps + 1):  # step 0 warms up
        if t == 1:
            _sync(device)
            began = time.perf_counter()
        for (first, n), update in zip(chunks, updates, strict=True):
            grads, _ = trainer._step(trainer._views(params[first:first + n], n), x[:n], y[:n], mask[:n], count[:n])
            update(t, n, grads)
        done += k * batch if t else 0
    _sync(device)
    out["samples_per_s"] = round(done / (time.perf_counter() - began))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[100])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--degree", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--max-one-by-one", type=int, default=1000, help="largest K also run with compute.batching=off")
    parser.add_argument("--loop-models", type=int, default=300, help="peers the plain PyTorch loop trains (a rate)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every simulated run (e.g. data.train_samples=2000)")
    parser.add_argument("--default-run", action="store_true", help="also time `meshfl run --set peers=100` (digits, MNIST)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    out: dict = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                 "threads": torch.get_num_threads(), "rounds": args.rounds, "runs": []}
    simulated(scale_overrides(16, 1, args.device, 4), "on")  # one-off costs (CUDA context, first vmap) not timed
    for k in args.peers:
        overrides = [*scale_overrides(k, args.rounds, args.device, args.degree), *args.overrides]
        batched = simulated(overrides, "on")
        per_peer = batched["train_samples"] // (k * args.rounds)  # one epoch a round: a peer's train split
        run: dict = {"peers": k, "samples_per_peer": per_peer, "batched": batched}
        if k <= args.max_one_by_one:
            run["one_by_one"] = simulated(overrides, "off")
        run["torch_loop"] = torch_loop(overrides, args.loop_models)
        run["bare_vmap_sim_batch"] = bare_vmap(overrides, max(1, min(32, per_peer)))
        run["bare_vmap_batch_32"] = bare_vmap(overrides, 32)
        train_rate = run["batched"]["train_samples_per_s"] or 0
        run["batched_vs_bare_vmap_same_batch"] = round(train_rate / run["bare_vmap_sim_batch"]["samples_per_s"], 3)
        run["batched_vs_torch_loop"] = round(train_rate / run["torch_loop"]["samples_per_s"], 2)
        if "one_by_one" in run:
            run["speedup_wall"] = round(run["one_by_one"]["wall_s"] / run["batched"]["wall_s"], 2)
        out["runs"].append(run)
        print(json.dumps(run), file=sys.stderr, flush=True)  # progress; the result is stdout's JSON
    if args.default_run:
        out["default_run"] = []
        for dataset in ("digits", "mnist"):
            overrides = ["peers=100", f"data.dataset={dataset}", f"train.device={args.device}"]
            row = {"dataset": dataset, "batched": simulated(overrides, "on"), "one_by_one": simulated(overrides, "off")}
            row["speedup_wall"] = round(row["one_by_one"]["wall_s"] / row["batched"]["wall_s"], 2)
            out["default_run"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
