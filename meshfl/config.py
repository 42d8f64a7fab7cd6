"""Typed experiment configuration: every knob has a default and a one-line description.

The CLI, `meshfl config` and the docs all read the descriptions from here, so a field is
documented in exactly one place. Algorithms declare their own sections (see
meshfl.algorithms.base); `ExperimentConfig` is assembled from the registry at import. Dotted keys (`gossip.gossip_fanout`) address nested fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from meshfl.algorithms import ALGORITHMS
from meshfl.core.section import Section as _Section
from meshfl.faults import FaultList, check_faults


class DataConfig(_Section):
    dataset: Literal["digits", "mnist", "numpy", "csv", "parquet", "json", "jsonl", "sql", "huggingface",
                     "dataframe", "torch"] = Field(
        "digits", description="digits ships with scikit-learn (offline); mnist reads IDX files; numpy/csv/parquet/json "
                              "(an array of records)/jsonl (a record per line) read `path`; sql reads `query` from the "
                              "database at URL `path`; huggingface: a save_to_disk folder in `path` or a datasets.Dataset, "
                              "dataframe: a pandas DataFrame, torch: a torch.utils.data.Dataset given to "
                              "meshfl.run(dataset=...) in this process")
    path: str | None = Field(
        None, description="mnist: directory with the IDX files (default $MESHFL_DATA/mnist); numpy: .npz with x,y[,x_test,y_test]; "
                          "csv/parquet/json/jsonl: a table file; sql: a SQLAlchemy URL, e.g. sqlite:////abs/data.db; "
                          "huggingface: a folder written by Dataset(Dict).save_to_disk (its 'test' split, if any, is the global test set)")
    query: str | None = Field(None, description="sql: a table name or a SELECT statement giving one row per sample")
    download: bool = Field(True, description="mnist: download from the public mirrors into the cache when the files are missing")
    label_column: str = Field("label", description="tables, sql, huggingface: name of the column holding the class label (any values; sorted, numbered 0..K-1)")
    feature_shape: list[int] | None = Field(None, description="tables, sql, huggingface, torch: reshape each row's features to this shape, e.g. [1, 8, 8] for a CNN (default: flat)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="every source without its own test split: fraction held out (stratified) as the global test set")
    partition: Literal["iid", "dirichlet", "shards", "quantity", "dominant"] = Field(
        "iid", description="how training samples are split among peers (dominant: non-IID level chi, see dominant_fraction)")
    dirichlet_alpha: float = Field(0.5, gt=0, description="dirichlet: concentration; small values give strong label skew")
    classes_per_peer: int = Field(2, ge=1, description="shards: number of distinct classes each peer holds")
    dominant_fraction: float = Field(
        0.8, ge=0, le=1, description="dominant: the non-IID level chi, the fraction of each peer's samples that share its one "
                                     "dominant label (peers take the labels in turn, in an order drawn from the seed); the rest "
                                     "are spread evenly over the other labels, every peer gets as many samples as the data allows "
                                     "for all of them alike")
    min_samples: int = Field(50, ge=1, description="quantity: smallest number of training samples a peer gets")
    max_samples: int = Field(500, ge=1, description="quantity: largest number of training samples a peer gets")
    local_test_fraction: float = Field(0.1, ge=0, lt=1, description="fraction of each peer's samples kept as its local test split")
    train_samples: int | None = Field(None, ge=1, description="use only this many training samples (a random subset drawn from the seed, before partitioning; cheaper runs); none: all")
    test_samples: int | None = Field(None, ge=1, description="evaluate on only this many global test samples (a random subset drawn from the seed; cheaper evaluations for runs that evaluate often); none: all")

    @model_validator(mode="after")
    def _sizes_ordered(self) -> DataConfig:
        if self.min_samples > self.max_samples:
            raise ValueError("data.min_samples must be <= data.max_samples")
        return self


class TrainConfig(_Section):
    model: str = Field("mlp", description="mlp (in-256-128-out), cnn (two convolutions), lenet5 (LeNet-5 with ReLU and max "
                                        "pooling; images of at least 12x12), or your own `package.module:factory` "
                                        "returning a torch.nn.Module, imported on each peer's machine (see meshfl/learn/models.py)")
    model_options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for a `package.module:factory` model, "
                                                                          "besides feature_shape and num_classes")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="local optimizer")
    learning_rate: float = Field(0.1, gt=0, description="local optimizer learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd momentum (state is reset every round)")
    batch_size: int = Field(32, ge=1, description="local mini-batch size")
    local_epochs: int = Field(3, ge=0, description="passes over the local train split per round (ignored when local_steps is set)")
    local_steps: int | None = Field(None, ge=1, description="fixed number of mini-batch steps per round instead of epochs")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where local training and evaluation run (auto: cuda when a GPU is there, else cpu)")
    loss: str = Field("cross_entropy", description="training (and evaluation) loss: cross_entropy, or your own "
                                                 "`package.module:function` (logits, labels) -> scalar tensor, imported on each peer's machine")
    metrics: dict[str, str] = Field(default_factory=dict, description="extra evaluation metrics, a list of `package.module:function` "
                                                                   "(logits, labels) -> float (or a mapping name: function); each is "
                                                                   "logged as local_metric_<name> and global_metric_<name>")
    step: str | None = Field(None, description="your own local training step `package.module:function` (see meshfl/learn/steps.py); "
                                               "default: meshfl's own loop")
    fedprox_mu: float = Field(0.0, ge=0, description="FedProx: adds (mu/2)||w - w_given||^2 to the local loss (0: off, plain local SGD)")
    buffers: Literal["average", "local"] = Field(
        "average", description="a model's float buffers (batch norm running mean/variance): average = they travel with the "
                               "parameters and are averaged with them; local = each peer keeps its own (FedBN), only "
                               "parameters travel, and the peer's buffers are put back before it trains or evaluates")

    @field_validator("model")
    @classmethod
    def _model_form(cls, value: str) -> str:
        if value in ("mlp", "cnn", "lenet5"):
            return value
        from meshfl.learn.models import check_model_name  # imports torch: only for user models

        return check_model_name(value)

    @field_validator("loss", "step")
    @classmethod
    def _function_form(cls, value: str | None) -> str | None:
        if value is None or value == "cross_entropy":
            return value
        from meshfl.learn.models import check_function_ref

        return check_function_ref(value)

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics_form(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, (list, tuple)):
            from meshfl.learn.models import function_name

            named: dict[str, Any] = {}
            for ref in value:
                if not isinstance(ref, str):
                    raise ValueError(f"must be a list of `package.module:function` strings (got {ref!r})")
                name = function_name(ref)
                if name in named:
                    raise ValueError(f"two metrics are named {name!r}; give a mapping name: function")
                named[name] = ref
            value = named
        if isinstance(value, dict):
            from meshfl.learn.models import check_function_ref

            for name, ref in value.items():
                if not str(name).isidentifier():
                    raise ValueError(f"metric name {name!r} must be an identifier")
                check_function_ref(str(ref))
        return value

    @model_validator(mode="after")
    def _one_step(self) -> TrainConfig:
        if self.step is not None and self.fedprox_mu > 0:
            raise ValueError("fedprox_mu: a user train.step trains as it sees fit; add the proximal term in it "
                             "(see meshfl.learn.steps.fedprox) or leave fedprox_mu at 0")
        return self


class TopologyConfig(_Section):
    kind: Literal["full", "ring", "line", "star", "grid", "random", "regular", "small_world"] = Field(
        "full", description="overlay graph between peers (regular: random topology.degree-regular graph)")
    degree: int = Field(8, ge=1, description="regular: every peer's number of neighbours (peers x degree must be even)")
    edge_probability: float = Field(0.3, gt=0, le=1, description="random: Erdos-Renyi edge probability p")
    small_world_neighbours: int = Field(4, ge=2, description="small_world: each peer links to this many nearest ring neighbours (even)")
    rewire_probability: float = Field(0.1, ge=0, le=1, description="small_world: probability of rewiring each edge")


class PeerLinkConfig(_Section):
    uplink_mbps: float | None = Field(None, gt=0, description="this peer's own uplink, megabits per second, shared by all its messages (default: none, only the links' bandwidth applies)")
    downlink_mbps: float | None = Field(None, gt=0, description="this peer's own downlink, megabits per second, capping every message it receives (default: none)")
    latency_s: float | None = Field(None, ge=0, description="this peer's one-way latency, seconds (default network.latency_s); a link takes the larger of its ends'")


class LinkConfig(_Section):
    peers: tuple[int, int] = Field(description="the two peers [a, b] of the link; the override holds in both directions")
    bandwidth_mbps: float | None = Field(None, gt=0, description="bandwidth cap of this link, megabits per second (the ends' uplink/downlink still apply)")
    latency_s: float | None = Field(None, ge=0, description="one-way latency of this link, seconds, instead of the larger of its ends'")
    loss: float = Field(0.0, ge=0, lt=1, description="probability that a message on this link is dropped, on top of network.loss")

    @model_validator(mode="after")
    def _two_peers(self) -> LinkConfig:
        a, b = self.peers
        if a == b or min(a, b) < 0:
            raise ValueError(f"[{a}, {b}] is not a link between two peers")
        return self


class NetworkConfig(_Section):
    latency_s: float = Field(0.01, ge=0, description="one-way latency of every peer, seconds (a message takes the larger of its two ends')")
    bandwidth_mbps: float = Field(100.0, gt=0, description="bandwidth of every link, megabits per second (each link sends one message at a time)")
    bandwidth_range_mbps: tuple[float, float] | None = Field(
        None, description="heterogeneous links: each pair of peers gets its own bandwidth [low, high] megabits per second, drawn "
                          "uniformly from the run seed (the same both ways, in both runtimes), instead of bandwidth_mbps; a "
                          "pair's network.links bandwidth_mbps replaces its draw; uplinks, downlinks and slow_link faults still "
                          "apply; over gRPC the sender waits size / bandwidth per message (none: every link bandwidth_mbps)")
    loss: float = Field(0.0, ge=0, lt=1, description="probability that a message is dropped on a link")
    peers: dict[int, PeerLinkConfig] = Field(default_factory=dict, description="per-peer overrides of uplink_mbps, downlink_mbps, latency_s, by peer id")
    links: list[LinkConfig] = Field(default_factory=list, description="per-pair overrides: peers [a, b], bandwidth_mbps, latency_s, loss (both directions)")

    @field_validator("bandwidth_range_mbps")
    @classmethod
    def _range_ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return value

    @model_validator(mode="after")
    def _links_once(self) -> NetworkConfig:
        seen: set[tuple[int, int]] = set()
        for link in self.links:
            pair = (min(link.peers), max(link.peers))
            if pair in seen:
                raise ValueError(f"network.links: the pair {list(link.peers)} is listed twice")
            seen.add(pair)
        if any(p < 0 for p in self.peers):
            raise ValueError("network.peers: peer ids are >= 0")
        return self

    def check_peers(self, peers: int) -> None:
        """ValueError naming the field if an override names a peer id >= peers (for the experiment's cross-checks)."""
        for p in self.peers:
            if p >= peers:
                raise ValueError(f"network.peers: peer {p} does not exist (peers are 0..{peers - 1})")
        for i, link in enumerate(self.links):
            for p in link.peers:
                if p >= peers:
                    raise ValueError(f"network.links.{i}.peers: peer {p} does not exist (peers are 0..{peers - 1})")


class ComputeTier(_Section):
    peers: list[int] | None = Field(None, description="the peers of this tier, by id")
    count: int | None = Field(None, ge=1, description="this many peers, drawn from the run seed among those no earlier tier took")
    fraction: float | None = Field(None, gt=0, le=1, description="this fraction of the peers (rounded, at least one), drawn like count")
    speed: float = Field(1.0, gt=0, description="speed factor of the tier's peers (replaces their uniform draw)")

    @model_validator(mode="after")
    def _one_target(self) -> ComputeTier:
        given = [name for name in ("peers", "count", "fraction") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("a compute tier needs exactly one of peers, count or fraction")
        if self.peers is not None and (not self.peers or min(self.peers) < 0 or len(set(self.peers)) != len(self.peers)):
            raise ValueError("a compute tier lists distinct peer ids >= 0")
        return self


class ComputeConfig(_Section):
    seconds_per_sample: float = Field(0.0001, ge=0, description="virtual seconds one training sample costs on a speed-1 peer")
    speed_min: float = Field(1.0, gt=0, description="slowest peer speed factor (peers draw uniformly in [speed_min, speed_max])")
    speed_max: float = Field(1.0, gt=0, description="fastest peer speed factor")
    tiers: list[ComputeTier] = Field(default_factory=list, description="heterogeneous compute: tiers of {peers | count | fraction, speed} applied after the uniform draw")
    batching: Literal["auto", "on", "off"] = Field(
        "auto", description="simulator: training and evaluation requests of one virtual instant run together, as one vmapped "
                            "batch of models (auto: training when train.model is mlp/cnn/lenet5 with the cross_entropy loss and no "
                            "train.step/fedprox_mu/metrics, evaluation too on a GPU; on: both, refusing a config that cannot "
                            "batch; off: one by one)")

    @field_validator("batching", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML reads a bare on/off as true/false."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _speeds_ordered(self) -> ComputeConfig:
        if self.speed_min > self.speed_max:
            raise ValueError("compute.speed_min must be <= compute.speed_max")
        return self

    def check_peers(self, peers: int) -> None:
        """ValueError naming the field if the tiers name a peer id >= peers or need more peers than there are."""
        explicit = [p for tier in self.tiers for p in tier.peers or ()]
        if len(set(explicit)) != len(explicit):
            raise ValueError("compute.tiers: a peer is in two tiers")
        for i, tier in enumerate(self.tiers):
            for p in tier.peers or ():
                if p >= peers:
                    raise ValueError(f"compute.tiers.{i}.peers: peer {p} does not exist (peers are 0..{peers - 1})")
        drawn = sum(tier.count if tier.count is not None else max(1, int((tier.fraction or 0) * peers + 0.5))
                    for tier in self.tiers if tier.peers is None)
        if drawn + len(explicit) > peers:
            raise ValueError(f"compute.tiers: the tiers take {drawn + len(explicit)} peers, more than the {peers} there are")


class WireConfig(_Section):
    max_message_mb: float = Field(128.0, gt=0, description="messages larger than this are refused at the door (MiB)")
    inbox_messages: int = Field(100_000, ge=1, description="messages a peer holds unread at most; more are dropped and counted")
    inbox_mb: float = Field(1024.0, gt=0, description="gRPC: bytes (MiB) of unread messages a peer holds at most; past it a "
                                                      "message is refused with RESOURCE_EXHAUSTED and its sender retries later")
    inbox_sender_share: float = Field(0.25, gt=0, le=1, description="gRPC: the largest part of inbox_mb one sender's unread messages may take")
    stream_buffer_mb: float = Field(
        128.0, gt=0, description="gRPC: bytes buffered in incoming streams, all streams together; a stream that would pass it "
                                 "is aborted (RESOURCE_EXHAUSTED, counted buffer_full); at least max_message_mb")
    stream_deadline_s: float = Field(
        10.0, gt=0, description="gRPC: an incoming stream must deliver its last chunk within this floor + its bytes so far / "
                                "stream_min_mb_per_s, or it is aborted (counted stream_deadline); senders give up at the same bound")
    stream_min_mb_per_s: float = Field(1.0, gt=0, description="gRPC: slowest average rate (MB/s, 10^6 bytes) a stream may have past stream_deadline_s")
    sender_messages_per_s: float = Field(1000.0, gt=0, description="gRPC: messages per second one sender may deliver on average (token bucket); more are refused (rate_limited)")
    sender_burst_messages: int = Field(5000, ge=1, description="gRPC: messages one sender may deliver at once above sender_messages_per_s")
    sender_mb_per_s: float = Field(200.0, gt=0, description="gRPC: MB (10^6 bytes) per second one sender may deliver on average; with mTLS counted as chunks arrive")
    sender_burst_mb: float = Field(512.0, gt=0, description="gRPC: MB one sender may deliver at once above sender_mb_per_s; at least max_message_mb")

    @model_validator(mode="after")
    def _bounds_hold_a_message(self) -> WireConfig:
        if self.stream_buffer_mb < self.max_message_mb:
            raise ValueError(f"wire.stream_buffer_mb ({self.stream_buffer_mb:g}) must be >= wire.max_message_mb "
                             f"({self.max_message_mb:g}), or the largest message could never be received")
        if self.sender_burst_mb * 1e6 < self.max_message_mb * (1 << 20):
            raise ValueError(f"wire.sender_burst_mb ({self.sender_burst_mb:g} MB) must hold wire.max_message_mb "
                             f"({self.max_message_mb:g} MiB), or the largest message could never be received")
        return self


class LivenessConfig(_Section):
    heartbeat_interval_s: float = Field(1.0, gt=0, description="gRPC: seconds between heartbeats on every open link")
    timeout_s: float = Field(5.0, gt=0, description="a peer silent this long is believed dead (both runtimes model the same detector)")
    watch: Literal["all", "overlay"] = Field("all", description="whom each peer's detector watches: every peer of the experiment, or only its overlay neighbours (others count as alive; fewer heartbeats at scale)")


class TlsConfig(_Section):
    mode: Literal["none", "tls", "mtls"] = Field("none", description="none: plaintext; tls: server certificates; mtls: both sides present certificates signed by the CA")
    ca: str | None = Field(None, description="CA certificate (PEM) that signs every peer's certificate")
    cert: str | None = Field(None, description="this peer's certificate (PEM)")
    key: str | None = Field(None, description="this peer's private key (PEM)")

    @model_validator(mode="after")
    def _files_given(self) -> TlsConfig:
        if self.mode != "none":
            missing = [name for name in ("ca", "cert", "key") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"grpc.tls.mode={self.mode} needs grpc.tls.{', grpc.tls.'.join(missing)}")
        return self


class KeysConfig(_Section):
    keyring: str | None = Field(None, description="JSON file with every peer's Ed25519 public key (made by `meshfl certs`, signed by the CA); none: keys derived from the run seed (fine in the simulator; over gRPC anyone who knows the config could forge signatures)")
    signing_key: str | None = Field(None, description="this peer's Ed25519 private key (PEM); {peer} is replaced by the peer id")

    @model_validator(mode="after")
    def _both_or_neither(self) -> KeysConfig:
        if (self.keyring is None) != (self.signing_key is None):
            given, missing = ("keyring", "signing_key") if self.keyring is not None else ("signing_key", "keyring")
            raise ValueError(f"keys.{missing}: needed with keys.{given} (give both or neither)")
        return self


class GrpcConfig(_Section):
    host: str = Field("127.0.0.1", description="launch --local: host every peer listens on")
    base_port: int = Field(50100, ge=1, le=65535, description="launch --local: peer i listens on base_port + i")
    chunk_kb: int = Field(1024, ge=1, description="large messages are streamed in chunks of this size")
    idle_link_s: float = Field(30.0, gt=0, description="a link to a peer outside the overlay is closed after this many idle seconds")
    connect_retries: int = Field(8, ge=0, description="reconnect attempts (jittered exponential backoff) before a neighbour is given up")
    backoff_initial_s: float = Field(0.2, gt=0, description="first reconnect delay")
    backoff_max_s: float = Field(5.0, gt=0, description="largest reconnect delay")
    resources_every_s: float = Field(5.0, ge=0, description="a peer process logs its CPU use (% of one core) and resident memory (MB) this often; 0: never")
    local_mtls: bool = Field(True, description="launch --local with grpc.tls.mode none: make a CA, certificates and signing keys for the run in <run>/certs and use mTLS (false: plaintext on loopback, where any local process can speak as any peer)")
    insecure: bool = Field(False, description="allow listening on a non-loopback address without mTLS (plaintext or tls); "
                                              "a warning is printed and logged at every start")
    stream_window_kb: int = Field(1024, ge=64, description="HTTP/2 flow-control window of an incoming stream, fixed (no BDP growth): what a "
                                                          "client may have in flight per stream before the peer reads it")
    max_streams_per_connection: int = Field(16, ge=1, description="concurrent calls one client connection may have open (grpc.max_concurrent_streams)")
    max_concurrent_rpcs: int = Field(0, ge=0, description="concurrent calls a peer serves in total, more are refused at once; 0: 4 x peers + 64")
    keepalive_s: float = Field(20.0, gt=0, description="HTTP/2 keepalive ping interval on every connection (both ends)")
    keepalive_timeout_s: float = Field(10.0, gt=0, description="a connection whose keepalive ping is not answered within this is closed")
    idle_connection_s: float = Field(300.0, gt=0, description="the server closes a client connection with no call for this long")
    max_connection_age_s: float = Field(3600.0, gt=0, description="the server asks a client to reconnect (a fresh handshake) after this long")
    connection_age_grace_s: float = Field(60.0, ge=0, description="calls in progress at max_connection_age_s may finish within this")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="transport security")


class CoreConfig(_Section):
    """The experiment's own fields; `ExperimentConfig` adds one section per registered algorithm."""

    name: str = Field("default", description="experiment name, used for the run folder")
    seed: int = Field(0, ge=0, description="run seed: a simulated run is a pure function of (config, seed)")
    peers: int = Field(8, ge=1, description="number of peers")
    rounds: int = Field(10, ge=1, description="number of federated rounds")
    algorithm: str = Field("gossip", description="peer algorithm, by its registered name; its settings are the section of that name")
    max_virtual_time_s: float = Field(1e6, gt=0, description="hard end of a simulated run; waits still pending then fail with their peers named")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset and partitioning")
    train: TrainConfig = Field(default_factory=TrainConfig, description="local training")
    topology: TopologyConfig = Field(default_factory=TopologyConfig, description="overlay graph")
    network: NetworkConfig = Field(default_factory=NetworkConfig, description="simulated links")
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="simulated compute speed")
    liveness: LivenessConfig = Field(default_factory=LivenessConfig, description="failure detector")
    faults: FaultList = Field(default_factory=list, description="fault schedule: crash, restart, wipe, loss, partition, heal, slow_link, straggler, join, leave events (see meshfl/faults.py)")
    wire: WireConfig = Field(default_factory=WireConfig, description="message limits")
    grpc: GrpcConfig = Field(default_factory=GrpcConfig, description="gRPC runtime: addresses, heartbeats, reconnects, TLS")
    keys: KeysConfig = Field(default_factory=KeysConfig, description="Ed25519 keys peers sign relayed content with")

    @model_validator(mode="after")
    def _cross_checks(self) -> CoreConfig:
        algorithm = ALGORITHMS.get(self.algorithm)
        if algorithm is None:
            raise ValueError(f"algorithm: must be one of {', '.join(sorted(ALGORITHMS))} (got {self.algorithm!r})")
        if algorithm.check is not None:
            algorithm.check(self.section(), self)
        check_faults(self.faults, self.peers)
        self.network.check_peers(self.peers)
        self.compute.check_peers(self.peers)
        k = self.topology.small_world_neighbours
        if self.topology.kind == "small_world" and (k % 2 or k >= self.peers):
            raise ValueError(f"topology.small_world_neighbours must be even and < peers ({self.peers}), got {k}")
        return self

    def section(self, name: str | None = None) -> Any:
        """The config section of algorithm `name` (default: the one this experiment runs).

        An algorithm registered after this class was built (e.g. by a test) has no field here:
        it gets its section's defaults.
        """
        name = name or self.algorithm
        value = getattr(self, name, None)
        if value is None and name in ALGORITHMS:
            return ALGORITHMS[name].config()
        if value is None:
            raise AttributeError(f"no config section {name!r}")
        return value


def _experiment_class() -> type[CoreConfig]:
    """CoreConfig plus a section per registered algorithm, each named after it."""
    sections: dict[str, Any] = {
        name: (algorithm.config, Field(default_factory=algorithm.config, description=algorithm.summary))
        for name, algorithm in sorted(ALGORITHMS.items())}
    return create_model("ExperimentConfig", __base__=CoreConfig, __module__=__name__, **sections)


ExperimentConfig = _experiment_class()


class ConfigError(ValueError):
    """A user-fixable config problem; its message is one line naming the field."""


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error":
        allowed = first.get("ctx", {}).get("expected", "")
        message = f"must be one of {allowed}"
    elif first["type"] == "extra_forbidden":
        message = "is not a known field (see `meshfl config`)"
    got = first.get("input")
    got_text = "" if first["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
    if field == "config" or message.split(" ", 1)[0].startswith(field.split(".")[0]):
        return message  # a cross-field check that names its fields itself
    return f"{field}: {message}{got_text}"


def _set_dotted(tree: dict[str, Any], dotted: str, raw: str) -> None:
    """Set `a.b.c` in a YAML tree; a number indexes into a list (`faults.0.count`, `network.links.1.bandwidth_mbps`).

    A list the YAML does not give starts from the field's default (so `faults.0.count` without
    a `faults:` list is out of range, not a new section). A number under a mapping is a key, as
    before (`network.peers.3.latency_s`). ConfigError (one line naming the key) for an index out
    of range or a value that is neither a list nor a section.
    """
    keys = dotted.split(".")
    if any(not key for key in keys):
        raise ConfigError(f"--set {dotted}: empty name in the dotted key")
    node: Any = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth]) or "config"
        if isinstance(node, list):
            if not key.isdigit():
                raise ConfigError(f"{dotted}: {where} is a list; index it with a number (0..{len(node) - 1})"
                                  if node else f"{dotted}: {where} is an empty list")
            index = int(key)
            if index >= len(node):
                span = f"items 0..{len(node) - 1}" if node else "no items"
                raise ConfigError(f"{dotted}: index {index} is out of range ({where} has {span})")
            if last:
                node[index] = _scalar(raw)
                return
            child = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = _scalar(raw)
                return
            if key not in node:
                default = _default_at(keys[:depth + 1])
                node[key] = list(default) if isinstance(default, list) else {}
            child = node[key]
        else:
            raise ConfigError(f"{dotted}: {where} is not a list or section (it is {node!r})")
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"{dotted}: {'.'.join(keys[:depth + 1])} is not a list or section (it is {child!r})")
        node = child


def _scalar(raw: str) -> Any:
    return yaml.safe_load(raw) if raw != "" else None


def _default_at(keys: list[str]) -> Any:
    """The default config's value at a dotted path, or None where the path leaves the defaults."""
    node: Any = _default_tree()
    for key in keys:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


_DEFAULTS: dict[str, Any] = {}


def _default_tree() -> dict[str, Any]:
    if not _DEFAULTS:
        _DEFAULTS.update(ExperimentConfig().model_dump(mode="json"))
    return _DEFAULTS


def read_yaml_mapping(p: Path, what: str = "config file") -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: {}); ConfigError with one line naming the file otherwise."""
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of fields")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load YAML (or defaults), apply `key=value` overrides, validate; raise ConfigError with one line."""
    tree: dict[str, Any] = read_yaml_mapping(Path(path)) if path is not None else {}
    return config_from_tree(tree, overrides)


def config_from_tree(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """A config mapping (changed in place) with `key=value` overrides applied, validated; ConfigError with one line."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set peers=4")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw.strip())
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def describe_fields(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every leaf field, for `meshfl config` and --help."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, f"{prefix}{name}."))
            continue
        rows.append((f"{prefix}{name}", repr(field.get_default(call_default_factory=True)), field.description or ""))
    return rows
