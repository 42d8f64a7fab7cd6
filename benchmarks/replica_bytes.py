"""Bytes of full vs delta checkpoint replicas on a model trained as federated rounds.

`--peers` peers each hold an IID shard, and each round every peer trains `--steps` SGD steps
(batch 32, lr 0.1) from the round's model and the models are averaged (FedAvg), so consecutive
round models differ as they do in a gossip run. Peer 0's model after each round is replicated:
round 1 full, later rounds as deltas against the previous replica (what the holder rebuilt).
For every value codec (float32, float16) and compression (zstd, gzip) it prints the payload bytes
per round (`meshfl.algorithms.replica_codec`: XOR of the bit patterns, byte planes, compression)
and, for comparison, other float32 delta forms: float subtraction + zstd (not exact), XOR + zstd,
zstd, XOR with byte planes + zstd. Prints JSON on stdout.

    MESHFL_DATA=../shared/data python benchmarks/replica_bytes.py --dataset mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshfl.algorithms.recovery import MESSAGES, Replica, ReplicaEntry  # noqa: E402
from meshfl.algorithms.replica_codec import decode_payload, encode_payload, pack  # noqa: E402
from meshfl.config import DataConfig  # noqa: E402
from meshfl.core.messages import register_message  # noqa: E402
from meshfl.core.params import Params, bind_flat  # noqa: E402
from meshfl.data.datasets import load_dataset  # noqa: E402
from meshfl.learn.models import mlp  # noqa: E402
from meshfl.wire.envelope import encoded_size  # noqa: E402


def rounds_of_models(dataset: str, peers: int, rounds: int, steps: int, seed: int) -> list[Params]:
    data_dir = os.environ.get("MESHFL_DATA", "../shared/data")
    train, _ = load_dataset(DataConfig(dataset=dataset, path=f"{data_dir}/mnist" if dataset == "mnist" else None), seed)
    torch.manual_seed(seed)
    module = mlp(tuple(train.x.shape[1:]), train.num_classes)
    flat = bind_flat(module)
    layout = Params.from_module(module).layout
    shards = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed)).chunk(peers)
    generator = torch.Generator().manual_seed(seed + 1)
    model = flat.clone()
    out = [Params(model.clone(), layout)]
    for _ in range(rounds):
        trained = []
        for shard in shards:
            flat.copy_(model)
            optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
            for _ in range(steps):
                batch = shard[torch.randint(len(shard), (32,), generator=generator)]
                optimiser.zero_grad()
                torch.nn.functional.cross_entropy(module(train.x[batch]), train.y[batch]).backward()
                optimiser.step()
            trained.append(flat.detach().clone())
        model = torch.stack(trained).mean(0)
        out.append(Params(model.clone(), layout))
    return out


def other_forms(previous: Params, current: Params) -> dict[str, int]:
    zstd = zstandard.ZstdCompressor(level=3)
    a, b = previous.flat.numpy(), current.flat.numpy()
    xor = a.view("<u4") ^ b.view("<u4")
    planes = xor.view("u1").reshape(-1, 4).T.copy().tobytes()
    return {"float_sub_zstd": len(zstd.compress((b - a).astype("<f4").tobytes())),
            "xor_zstd": len(zstd.compress(xor.tobytes())), "xor_planes_zstd": len(zstd.compress(planes))}


def wire_bytes(payload: bytes, layout, codec: str, compression: str, base_round: int) -> int:
    """Bytes of the whole Replica message on the wire (payload packed 7 bytes to an integer, a signature)."""
    entry = ReplicaEntry(round=2, base_round=base_round, codec=codec, compression=compression,
                         fingerprint=layout.fingerprint, checksum="0" * 64, length=len(payload), payload=pack(payload),
                         signature="0" * 128)
    return encoded_size(Replica(sender=0, origin=0, entry=entry))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="SGD steps per peer per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for cls in MESSAGES:
        register_message(cls, f"bench.{cls.__name__}")
    models = rounds_of_models(args.dataset, args.peers, args.rounds, args.steps, args.seed)[1:]
    layout = models[0].layout
    result: dict = {"dataset": args.dataset, "numel": layout.numel, "raw_float32_bytes": 4 * layout.numel,
                    "rounds": args.rounds, "steps": args.steps, "peers": args.peers, "codecs": {}}
    for codec in ("float32", "float16"):
        for compression in ("zstd", "gzip"):
            base: Params | None = None
            sizes, wire, errors, exact = [], [], [], True
            for model in models:
                payload, rebuilt = encode_payload(model, base, codec, compression)
                got = decode_payload(payload, layout, base, codec, compression)
                exact = exact and got.equal(rebuilt)
                errors.append(float((got.flat - model.flat).abs().max()))
                sizes.append(len(payload))
                wire.append(wire_bytes(payload, layout, codec, compression, -1 if base is None else 1))
                base = rebuilt
            result["codecs"][f"{codec}+{compression}"] = {
                "full_bytes": sizes[0], "delta_bytes": sizes[1:], "full_wire_bytes": wire[0], "delta_wire_bytes": wire[1:],
                "delta_over_full": [round(s / sizes[0], 3) for s in sizes[1:]],
                "rebuilt_exactly": exact, "max_abs_error": max(errors)}
    result["other_delta_forms"] = [other_forms(a, b) for a, b in zip(models, models[1:], strict=False)]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
