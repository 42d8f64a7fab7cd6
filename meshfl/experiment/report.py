"""Plots and a self-contained HTML report for one run folder.

Reads the events written to metrics.jsonl and the run summary; writes three PNGs and a
report.html that embeds them as data URIs, so the report can be mailed or archived as
one file. Plots use rounds on the x axis when every accuracy event carries one, else the
runtime's clock (virtual time; the launcher's wall clock for gRPC runs), and mark each
peer's crashes (red x and dashed line) and restarts (green triangle and dotted line) from
its lifecycle events. Uses matplotlib's object API on Agg (no pyplot): no global backend switch, no
figure registry to leak, safe to call from any thread or a headless machine.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from meshfl.core.metrics import (
    FAULT,
    GLOBAL_ACCURACY,
    GLOBAL_LOSS,
    METRIC,
    STATUS_CRASHED,
    STATUS_RUNNING,
    STATUS_STOPPED,
    TRAIN_LOSS,
)
from meshfl.experiment.peers import Moment, PeerHistory, peer_histories

DPI = 110
MAX_LEGEND_PEERS = 12
MAX_LABELLED_BARS = 40
MAX_TIMELINE_ROWS = 50
MAX_DESCRIBED_PLOTS = 6
PEER_COLOR = "#4c72b0"
DEAD_COLOR = "#c44e52"
MEAN_COLOR = "#111111"
CRASH_COLOR = "#d62728"
RESTART_COLOR = "#2ca02c"
# per-peer line colours when peers are labelled: tab10 without its red and green (crash, restart marks)
PEER_PALETTE = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
                "#393b79", "#5254a3", "#8c6d31", "#6b6ecf")


@dataclass(frozen=True)
class MetricGrid:
    """One metric as a peers x rounds array; NaN where a peer reported nothing that round."""

    peers: np.ndarray  # (P,) int, sorted
    rounds: np.ndarray  # (R,) int, sorted
    values: np.ndarray  # (P, R) float

    @property
    def empty(self) -> bool:
        return self.values.size == 0

    def mean_per_round(self) -> np.ndarray:
        """Mean over the peers that reported; NaN for a round nobody reported (no warning)."""
        have = ~np.isnan(self.values)
        count = have.sum(axis=0)
        total = np.where(have, self.values, 0.0).sum(axis=0)
        return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)


# --- events -> arrays ------------------------------------------------------------------------


def collect_metrics(events: Iterable[Any]) -> dict[str, MetricGrid]:
    """Every metric event as a grid, keyed by metric name; other or malformed events are skipped."""
    columns: dict[str, tuple[list[int], list[int], list[float]]] = {}
    for event in events:
        row = _metric_row(event)
        if row is None:
            continue
        name, peer, rnd, value = row
        peers, rounds, values = columns.setdefault(name, ([], [], []))
        peers.append(peer)
        rounds.append(rnd)
        values.append(value)
    return {name: _grid(*cols) for name, cols in sorted(columns.items())}


def _metric_row(event: Any) -> tuple[str, int, int, float] | None:
    if not isinstance(event, dict) or event.get("event") != METRIC:
        return None
    try:
        return str(event["metric"]), int(event["peer"]), int(event["round"]), float(event["value"])
    except (KeyError, TypeError, ValueError):
        return None


def _grid(peers: list[int], rounds: list[int], values: list[float]) -> MetricGrid:
    """Scatter (peer, round, value) columns into a dense array; a repeated point keeps the last value."""
    peer_ids, peer_idx = np.unique(np.asarray(peers, dtype=np.int64), return_inverse=True)
    round_ids, round_idx = np.unique(np.asarray(rounds, dtype=np.int64), return_inverse=True)
    grid = np.full((peer_ids.size, round_ids.size), np.nan)
    grid[peer_idx, round_idx] = np.asarray(values, dtype=float)
    return MetricGrid(peer_ids, round_ids, grid)


def _empty_grid() -> MetricGrid:
    return MetricGrid(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, 0)))


Series = dict[int, tuple[np.ndarray, np.ndarray]]
"""peer -> (x, y) in event order; y is NaN where a value was null."""


def has_rounds(events: Iterable[Any], metric: str = GLOBAL_ACCURACY) -> bool:
    """True when there are `metric` events and every one carries an integer round."""
    seen = False
    for event in events:
        if isinstance(event, dict) and event.get("event") == METRIC and event.get("metric") == metric:
            if not isinstance(event.get("round"), int):
                return False
            seen = True
    return seen


def collect_series(events: Iterable[Any], metric: str, x_key: str) -> Series:
    """Every peer's `metric` values against `x_key` (virtual_time, wall_time or round)."""
    points: dict[int, tuple[list[float], list[float]]] = {}
    for event in events:
        if not isinstance(event, dict) or event.get("event") != METRIC or event.get("metric") != metric:
            continue
        try:
            peer, x = int(event["peer"]), float(event[x_key])
            value = event.get("value")
            y = float("nan") if value is None else float(value)
        except (KeyError, TypeError, ValueError):
            continue
        xs, ys = points.setdefault(peer, ([], []))
        xs.append(x)
        ys.append(y)
    return {p: (np.asarray(xs), np.asarray(ys)) for p, (xs, ys) in sorted(points.items())}


def mean_of_latest(events: Iterable[Any], metric: str, peers: int, x_key: str = "virtual_time") -> tuple[list[float], list[float]]:
    """The mean over peers of each one's latest `metric` value, at every new value once all `peers` have one:
    accuracy against time for algorithms whose peers evaluate at their own pace."""
    points = sorted((float(e[x_key]), int(e["peer"]), float(e["value"])) for e in events
                    if isinstance(e, dict) and e.get("event") == METRIC and e.get("metric") == metric
                    and isinstance(e.get("value"), (int, float)) and x_key in e)
    latest: dict[int, float] = {}
    xs, means = [], []
    for x, peer, value in points:
        latest[peer] = value
        if len(latest) >= peers:
            xs.append(x)
            means.append(sum(latest.values()) / len(latest))
    return xs, means


# --- summary helpers -------------------------------------------------------------------------


def _per_peer(summary: dict[str, Any], key: str) -> dict[int, float]:
    """A {"peer id": value} summary entry with int keys; entries that do not parse are dropped."""
    out: dict[int, float] = {}
    raw = summary.get(key)
    if not isinstance(raw, dict):
        return out
    for k, v in raw.items():
        try:
            out[int(k)] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def _dead_peers(summary: dict[str, Any]) -> set[int]:
    dead = summary.get("dead_peers") or []
    try:
        return {int(p) for p in dead}
    except (TypeError, ValueError):
        return set()


def _all_peers(summary: dict[str, Any], *grids: MetricGrid) -> list[int]:
    """Every peer id the run mentions: 0..peers-1 plus any id seen in summary or metrics."""
    ids: set[int] = set()
    if isinstance(summary.get("peers"), int):
        ids.update(range(summary["peers"]))
    for key in ("final_global_accuracy", "messages_sent", "bytes_sent"):
        ids.update(_per_peer(summary, key))
    for grid in grids:
        ids.update(grid.peers.tolist())
    return sorted(ids | _dead_peers(summary))


# --- plots -----------------------------------------------------------------------------------


def _new_figure(width: float = 8.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    return path


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set_xticks([])
    ax.set_yticks([])


def _accuracy_ylim(values: np.ndarray) -> tuple[float, float]:
    """0..1, zoomed to the top when every point is high so late-round differences stay visible."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo = float(finite.min())
    bottom = 0.0 if lo < 0.5 else max(0.0, math.floor(lo * 10 - 0.25) / 10)
    top = max(1.0, float(finite.max()))
    return bottom, top + 0.015 * (top - bottom)


def plot_accuracy(grid: MetricGrid, dead: set[int], path: Path,
                  histories: dict[int, PeerHistory] | None = None) -> Path:
    """Per round: one thin line per peer, bold mean; a dead peer is drawn in red and ends with
    an x; crashes and restarts from `histories` are marked at the round the peer was in."""
    fig = _new_figure()
    ax = fig.add_subplot()
    if grid.empty:
        _no_data(ax, "global accuracy")
        return _save(fig, path)
    show_legend = grid.peers.size <= MAX_LEGEND_PEERS
    alpha = 0.9 if show_legend else max(0.25, min(0.7, 8 / grid.peers.size))
    series: Series = {}
    histories = histories or {}
    first = float(grid.rounds.min())

    def at_round(moment: Moment) -> float:
        return first - 0.5 if moment.round is None else float(moment.round)

    for i, (peer, row) in enumerate(zip(grid.peers.tolist(), grid.values, strict=True)):
        _plot_peer_line(ax, grid.rounds, row, peer, peer in dead, show_legend, alpha, i,
                        _breaks(histories.get(peer), at_round))
        series[peer] = (grid.rounds.astype(float), row)
    ax.plot(grid.rounds, grid.mean_per_round(), color=MEAN_COLOR, lw=2.6, marker="o", ms=4, label="mean", zorder=5)
    ax.set_ylim(*_accuracy_ylim(grid.values))
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy")
    ax.set_title(f"Global test accuracy per peer ({grid.peers.size} peers, mean in bold)")
    _round_axis(ax, grid.rounds)
    marked = _mark_lifecycle(ax, histories, series, at_round)
    _accuracy_legend(ax, show_legend, bool(dead & set(grid.peers.tolist())), marked)
    return _save(fig, path)


def plot_accuracy_over_time(series: Series, dead: set[int], path: Path, histories: dict[int, PeerHistory] | None,
                            time_key: str = "virtual_time") -> Path:
    """Accuracy against the runtime's clock (for events without rounds), with crash/restart marks."""
    fig = _new_figure()
    ax = fig.add_subplot()
    if not series:
        _no_data(ax, "global accuracy")
        return _save(fig, path)
    show_legend = len(series) <= MAX_LEGEND_PEERS
    alpha = 0.9 if show_legend else max(0.25, min(0.7, 8 / len(series)))
    histories = histories or {}
    start = min(float(x.min()) for x, _ in series.values() if x.size)

    def at(moment: Moment) -> float:
        value = getattr(moment, time_key)
        return start if value is None else float(value)

    for i, (peer, (x, y)) in enumerate(series.items()):
        _plot_peer_line(ax, x, y, peer, peer in dead, show_legend, alpha, i, _breaks(histories.get(peer), at))
    values = np.concatenate([y for _, y in series.values()])
    ax.set_ylim(*_accuracy_ylim(values))
    clock = "wall-clock time (s)" if time_key == "wall_time" else "virtual time (s)"
    ax.set_xlabel(clock)
    ax.set_ylabel("global test accuracy")
    ax.set_title(f"Global test accuracy per peer over {clock.split(' (')[0]} ({len(series)} peers)")
    ax.grid(True, alpha=0.3)
    marked = _mark_lifecycle(ax, histories, series, at)
    _accuracy_legend(ax, show_legend, bool(dead & set(series)), marked, with_mean=False)
    return _save(fig, path)


def _mark_lifecycle(ax: Any, histories: dict[int, PeerHistory], series: Series, x_of: Any) -> set[str]:
    """A red x on the peer's line and a dashed red line at each crash; a green triangle at the
    bottom and a dotted green line at each restart. Returns which kinds were drawn."""
    bottom = blended_transform_factory(ax.transData, ax.transAxes)
    drawn: set[str] = set()
    for peer, history in histories.items():
        x_line, y_line = series.get(peer, (np.zeros(0), np.zeros(0)))
        for crash in history.crashes:
            x = x_of(crash)
            ax.axvline(x, color=CRASH_COLOR, ls="--", lw=0.9, alpha=0.55, zorder=3)
            before = np.isfinite(y_line) & (x_line <= x)
            if before.any():
                ax.plot([x], [y_line[before][-1]], marker="x", ms=10, mew=2.4, color=CRASH_COLOR, ls="none", zorder=7)
            else:
                ax.plot([x], [0.04], marker="x", ms=10, mew=2.4, color=CRASH_COLOR, ls="none", zorder=7,
                        transform=bottom)
            ax.annotate(f"{peer}", (x, 0.97), xycoords=bottom, color=CRASH_COLOR, fontsize=7, ha="center", va="top")
            drawn.add("crash")
        for restart in history.restarts:
            x = x_of(restart)
            ax.axvline(x, color=RESTART_COLOR, ls=":", lw=1.1, alpha=0.7, zorder=3)
            ax.plot([x], [0.04], marker="^", ms=9, color=RESTART_COLOR, ls="none", zorder=7, transform=bottom)
            ax.annotate(f"{peer}", (x, 0.08), xycoords=bottom, color=RESTART_COLOR, fontsize=7, ha="center",
                        va="bottom")
            drawn.add("restart")
    return drawn


def _accuracy_legend(ax: Any, per_peer: bool, any_dead: bool, marked: set[str], with_mean: bool = True) -> None:
    extra = []
    if "crash" in marked:
        extra.append(Line2D([], [], color=CRASH_COLOR, ls="--", lw=0.9, marker="x", mew=2, label="crash"))
    if "restart" in marked:
        extra.append(Line2D([], [], color=RESTART_COLOR, ls=":", lw=1.1, marker="^", label="restart"))
    if per_peer:
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + extra, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        return
    handles = [Line2D([], [], color=PEER_COLOR, lw=1, label="one peer")]
    if with_mean:
        handles.append(Line2D([], [], color=MEAN_COLOR, lw=2.6, label="mean"))
    if any_dead:
        handles.append(Line2D([], [], color=DEAD_COLOR, lw=1, ls="--", marker="x", label="dead peer"))
    ax.legend(handles=handles + extra, loc="lower right", fontsize=8)


def _breaks(history: PeerHistory | None, x_of: Any) -> list[float]:
    """Where a peer's line must not be joined: at each crash (its crash mark ends the segment)."""
    if history is None:
        return []
    return [x_of(c) for c in history.crashes]


def _plot_peer_line(ax: Any, rounds: np.ndarray, row: np.ndarray, peer: int, dead: bool, labelled: bool,
                    alpha: float, index: int = 0, breaks: list[float] | None = None) -> None:
    """Joins the points a peer did report, so a missed round does not hide its neighbours, but
    not across a crash (`breaks`): a restarted peer's lives are separate segments."""
    have = np.isfinite(row)
    x, y = rounds[have], row[have]
    label = (f"peer {peer} (dead)" if dead else f"peer {peer}") if labelled else None
    color = PEER_PALETTE[index % len(PEER_PALETTE)] if labelled else DEAD_COLOR if dead else PEER_COLOR
    style: dict[str, Any] = {"lw": 1.0, "alpha": alpha, "color": color}
    if dead:  # drawn above the crowd so where it stopped stays visible
        style.update(ls="--", lw=1.4, alpha=1.0, zorder=4)
    cuts = np.searchsorted(x, sorted(breaks or []), side="right") if x.size else []
    for i, (xs, ys) in enumerate(zip(np.split(x, cuts), np.split(y, cuts), strict=True)):
        ax.plot(xs, ys, marker="." if x.size < 30 else None, ms=4, label=label if i == 0 else None, **style)
    if dead and x.size and not breaks:
        ax.plot(x[-1:], y[-1:], marker="x", ms=9, mew=2.2, color=color, ls="none", zorder=6)


def _round_axis(ax: Any, rounds: np.ndarray) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if rounds.size:
        pad = 0.3 if rounds.size < 10 else 0.5
        ax.set_xlim(rounds.min() - pad, rounds.max() + pad)
    ax.grid(True, alpha=0.3)


def plot_messages(peers: list[int], messages: dict[int, float], sent_bytes: dict[int, float], dead: set[int],
                  path: Path) -> Path:
    """Two bar panels, messages and bytes sent per peer; dead peers in red, dashed line = mean."""
    fig = _new_figure(8.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    if not peers or not (messages or sent_bytes):
        _no_data(top, "messages")
        _no_data(bottom, "bytes")
        return _save(fig, path)
    x = np.asarray(peers)
    colors = [DEAD_COLOR if p in dead else PEER_COLOR for p in peers]
    counts = np.asarray([messages.get(p, 0.0) for p in peers])
    scale, unit = _byte_unit(max(sent_bytes.values(), default=0.0))
    volume = np.asarray([sent_bytes.get(p, 0.0) for p in peers]) / scale
    _bars(top, x, counts, colors, "messages sent")
    _bars(bottom, x, volume, colors, f"{unit} sent")
    top.set_title(f"Messages and bytes sent per peer (total {int(counts.sum()):,} messages, "
                  f"{_human_bytes(float(sum(sent_bytes.values())))})")
    bottom.set_xlabel("peer")
    if len(peers) <= MAX_LABELLED_BARS:
        bottom.set_xticks(x)
        bottom.tick_params(axis="x", labelsize=8 if len(peers) > 16 else 10)
    else:
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    handles = [Patch(color=PEER_COLOR, label="alive peer")]
    if dead:
        handles.append(Patch(color=DEAD_COLOR, label="dead peer"))
    handles.append(Line2D([], [], color=MEAN_COLOR, ls="--", lw=1, label="mean"))
    top.set_ylim(0, max(1.0, float(counts.max())) * 1.18)  # headroom for the legend
    top.legend(handles=handles, loc="upper right", ncols=len(handles), fontsize=8)
    return _save(fig, path)


def _bars(ax: Any, x: np.ndarray, heights: np.ndarray, colors: list[str], ylabel: str) -> None:
    ax.bar(x, heights, color=colors, width=0.8)
    if heights.size:
        ax.axhline(float(heights.mean()), color=MEAN_COLOR, ls="--", lw=1, alpha=0.7)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_loss_over_time(global_loss: Series, path: Path, time_key: str = "virtual_time") -> Path:
    """Global test loss of each peer against the runtime's clock (for events without rounds)."""
    fig = _new_figure()
    ax = fig.add_subplot()
    if not global_loss:
        _no_data(ax, "loss")
        return _save(fig, path)
    alpha = 0.9 if len(global_loss) <= MAX_LEGEND_PEERS else max(0.25, min(0.7, 8 / len(global_loss)))
    for x, y in global_loss.values():
        have = np.isfinite(y)
        ax.plot(x[have], y[have], color=PEER_COLOR, lw=1.0, alpha=alpha)
    ax.set_xlabel("wall-clock time (s)" if time_key == "wall_time" else "virtual time (s)")
    ax.set_ylabel("global test loss")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Global test loss per peer ({len(global_loss)} peers)")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_loss(global_loss: MetricGrid, train_loss: MetricGrid, path: Path) -> Path:
    """Mean global test loss per round with the min-max band over peers; mean train loss dashed."""
    fig = _new_figure()
    ax = fig.add_subplot()
    if global_loss.empty and train_loss.empty:
        _no_data(ax, "loss")
        return _save(fig, path)
    if not global_loss.empty:
        _loss_band(ax, global_loss)
        ax.plot(global_loss.rounds, global_loss.mean_per_round(), color=PEER_COLOR, lw=2.2, marker="o", ms=4,
                label="mean global test loss")
    if not train_loss.empty:
        ax.plot(train_loss.rounds, train_loss.mean_per_round(), color="#dd8452", lw=1.6, ls="--", marker=".",
                label="mean train loss")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.set_ylim(bottom=0)
    ax.set_title("Loss per round")
    _round_axis(ax, np.union1d(global_loss.rounds, train_loss.rounds))
    ax.legend(fontsize=8)
    return _save(fig, path)


def _loss_band(ax: Any, grid: MetricGrid) -> None:
    have = np.isfinite(grid.values).any(axis=0)
    if grid.peers.size < 2 or not have.any():
        return
    low = np.min(np.where(np.isfinite(grid.values), grid.values, np.inf), axis=0)
    high = np.max(np.where(np.isfinite(grid.values), grid.values, -np.inf), axis=0)
    ax.fill_between(grid.rounds[have], low[have], high[have], color=PEER_COLOR, alpha=0.15, lw=0,
                    label="min-max over peers")


# --- formatting ------------------------------------------------------------------------------


def _byte_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= scale:
            return float(scale), unit
    return 1.0, "bytes"


def _human_bytes(n: float) -> str:
    scale, unit = _byte_unit(n)
    return f"{int(n):,} bytes" if scale == 1.0 else f"{n / scale:.1f} {unit}"


def _fmt_acc(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _fmt_seconds(value: Any) -> str:
    try:
        s = float(value)
    except (TypeError, ValueError):
        return "—"
    if s >= 3600:
        return f"{s:.1f} s ({int(s // 3600)}h {int(s % 3600 // 60):02d}m)"
    if s >= 120:
        return f"{s:.1f} s ({int(s // 60)}m {s % 60:04.1f}s)"
    return f"{s:.2f} s"


def _fmt_count(value: float | None) -> str:
    return "—" if value is None else f"{int(value):,}"


def _summary_accuracy(summary: dict[str, Any], key: str, final: dict[int, float], reduce: Any) -> float | None:
    """The summary's own figure when present (null: none), else recomputed from the per-peer finals."""
    if key in summary and summary[key] is None:
        return None
    try:
        return float(summary[key])
    except (KeyError, TypeError, ValueError):
        return float(reduce(list(final.values()))) if final else None


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1000px;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-variant-numeric: tabular-nums; }
th, td { padding: 0.25rem 0.8rem; border-bottom: 1px solid #eee; text-align: left; }
td.num { text-align: right; }
tr.dead td, td.dead { background: #fde2e2; color: #8a1f1f; font-weight: 600; }
th.num { text-align: right; }
tr.stopped td { background: #fff6db; }
p.interrupted { background: #fff3cd; border: 1px solid #e0c36b; padding: 0.6rem 0.9rem; font-weight: 600; }
img { max-width: 100%; height: auto; display: block; margin: 0.5rem 0 1.5rem; }
pre { background: #f6f8fa; padding: 1rem; overflow-x: auto; font-size: 0.85rem; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _row(label: str, value: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f"<tr><th>{html.escape(label)}</th><td{cls}>{html.escape(value)}</td></tr>"


def _summary_table(summary: dict[str, Any], peers: list[int], final: dict[int, float], messages: dict[int, float],
                   sent_bytes: dict[int, float], dead: set[int], histories: dict[int, PeerHistory] | None = None,
                   faults: list[dict] | None = None) -> str:
    total_bytes = sum(sent_bytes.values()) if sent_bytes else None
    rows = [] if not summary.get("interrupted") else [
        _row("Interrupted", "yes: stopped before it finished; figures are what was recorded until then", "dead")]
    rows += [
        _row("Peers", str(summary.get("peers", len(peers)))),
        _row("Rounds", str(summary.get("rounds", "—"))),
        _row("Mean final accuracy", _fmt_acc(_summary_accuracy(summary, "mean_final_accuracy", final, np.mean))),
        _row("Min final accuracy", _fmt_acc(_summary_accuracy(summary, "min_final_accuracy", final, np.min))),
        _row("Total messages", _fmt_count(sum(messages.values()) if messages else None)),
        _row("Total bytes", "—" if total_bytes is None else f"{int(total_bytes):,} ({_human_bytes(total_bytes)})"),
        _row("Wall time", _fmt_seconds(summary.get("wall_time_s"))),
    ]
    if summary.get("runtime") == "grpc":  # real peers: their own clocks, and what the network did
        refused = summary.get("total_refused", 0)
        rows += [
            _row("Runtime", "gRPC, one process per peer"),
            _row("Longest peer clock", _fmt_seconds(summary.get("virtual_time_s"))),
            _row("Wire bytes / algorithm bytes", _fmt_ratio(summary.get("wire_overhead_ratio"))),
            _row("Messages refused at the door", _fmt_count(refused), "dead" if refused else ""),
        ]
    else:
        rows.append(_row("Virtual time", _fmt_seconds(summary.get("virtual_time_s"))))
    histories = histories or {}
    crashes = sum(len(h.crashes) for h in histories.values())
    restarts = sum(len(h.restarts) for h in histories.values())
    if crashes or restarts:
        rows.append(_row("Crashes / restarts", f"{crashes} / {restarts}", "dead" if crashes else ""))
    if faults:
        kinds = sorted({str(f.get("kind", "?")) for f in faults})
        rows.append(_row("Faults fired", f"{len(faults)} ({', '.join(kinds)})"))
    rows.append(_row("Dead peers", ", ".join(map(str, sorted(dead))) if dead else "none", "dead" if dead else ""))
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def described_metrics(events: Iterable[Any]) -> dict[str, dict[int, tuple[list[float], list[float]]]]:
    """Metrics logged `about` another peer, as {metric: {described peer: (rounds, values)}}, in
    event order; only events that carry a round (one peer's view of others, round by round)."""
    found: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
    for e in events:
        if not isinstance(e, dict) or e.get("event") != METRIC or "about" not in e:
            continue
        about, rnd, value = e.get("about"), e.get("round"), e.get("value")
        if not isinstance(about, int) or not isinstance(rnd, int) or not isinstance(value, (int, float)):
            continue
        xs, ys = found.setdefault(str(e.get("metric")), {}).setdefault(about, ([], []))
        xs.append(float(rnd))
        ys.append(float(value))
    return found


def plot_described(metric: str, lines: dict[int, tuple[list[float], list[float]]], path: Path) -> Path:
    """One line per described peer against the round (e.g. each worker's round trip)."""
    fig = _new_figure()
    ax = fig.add_subplot()
    peers = sorted(lines)
    labelled = len(peers) <= MAX_LEGEND_PEERS
    for i, peer in enumerate(peers):
        xs, ys = lines[peer]
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=PEER_PALETTE[i % len(PEER_PALETTE)] if labelled else PEER_COLOR,
                alpha=0.9 if labelled else 0.5, label=f"peer {peer}" if labelled else None)
    unit = " (s)" if metric.endswith("_s") else ""
    ax.set_xlabel("round")
    ax.set_ylabel(metric.replace("_", " ") + unit)
    ax.set_title(f"{metric} per peer ({len(peers)} peers)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if labelled:
        ax.legend(loc="best", fontsize=8, ncols=2 if len(peers) > 6 else 1)
    return _save(fig, path)


RESOURCE_METRICS = (("cpu_percent", "CPU (% of one core)"), ("memory_mb", "resident memory (MB)"))


def plot_resources(events: list[Any], path: Path) -> Path | None:
    """CPU and memory of every peer process against wall time (what `meshfl node` logs every grpc.resources_every_s);
    None when the run logged neither (the simulator: one process for every peer)."""
    series = {metric: collect_series(events, metric, "wall_time") for metric, _ in RESOURCE_METRICS}
    if not any(series.values()):
        return None
    fig = _new_figure(10.0, 4.0)
    for i, (metric, label) in enumerate(RESOURCE_METRICS):
        ax = fig.add_subplot(1, 2, i + 1)
        peers = sorted(series[metric])
        labelled = len(peers) <= MAX_LEGEND_PEERS
        for j, peer in enumerate(peers):
            xs, ys = series[metric][peer]
            ax.plot(xs, ys, lw=1.0, alpha=0.85 if labelled else 0.5,
                    color=PEER_PALETTE[j % len(PEER_PALETTE)] if labelled else PEER_COLOR, label=f"peer {peer}" if labelled else None)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel(label)
        top = max((float(np.nanmax(ys)) for _, ys in series[metric].values() if ys.size), default=1.0)
        ax.set_ylim(0, max(top, 1e-9) * 1.15)
        ax.grid(alpha=0.3)
        if labelled and peers and i == 0:
            ax.legend(loc="best", fontsize=7, ncols=2 if len(peers) > 6 else 1)
    fig.suptitle(f"resources per peer process ({len(series['cpu_percent']) or len(series['memory_mb'])} processes)")
    return _save(fig, path)


def matrix_metrics(events: Iterable[Any]) -> dict[str, dict[tuple[int, int], float]]:
    """Totals one peer logged `about` another without a round (layers pulled from each neighbour,
    interactions with each neighbour), as {metric: {(peer, described peer): value}}; a repeated pair sums."""
    found: dict[str, dict[tuple[int, int], float]] = {}
    for e in events:
        if not isinstance(e, dict) or e.get("event") != METRIC or "about" not in e or e.get("round") is not None:
            continue
        peer, about, value = e.get("peer"), e.get("about"), e.get("value")
        if not isinstance(peer, int) or not isinstance(about, int) or not isinstance(value, (int, float)):
            continue
        cells = found.setdefault(str(e.get("metric")), {})
        cells[(peer, about)] = cells.get((peer, about), 0.0) + float(value)
    return found


def plot_matrix(metric: str, cells: dict[tuple[int, int], float], path: Path) -> Path:
    """A heat map: row = the peer that logged, column = the peer it is about (blank: never logged)."""
    peers = sorted({p for pair in cells for p in pair})
    index = {p: i for i, p in enumerate(peers)}
    grid = np.full((len(peers), len(peers)), np.nan)
    for (peer, about), value in cells.items():
        grid[index[peer], index[about]] = value
    side = min(4.0 + 0.25 * len(peers), 12.0)
    fig = _new_figure(side + 1.5, side)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label=metric.replace("_", " "))
    ticks = list(range(len(peers))) if len(peers) <= 40 else list(range(0, len(peers), max(1, len(peers) // 20)))
    ax.set_xticks(ticks, [str(peers[i]) for i in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(peers[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("about peer")
    ax.set_ylabel("peer")
    ax.set_title(f"{metric.replace('_', ' ')}: peer (row) about peer (column)")
    return _save(fig, path)


def _timeline_table(summary: dict[str, Any]) -> str:
    """The algorithm's notable moments (`Algorithm.timeline`), e.g. who coordinates from which round."""
    rows = summary.get("timeline") or []
    if not rows:
        return ""
    head = ('<tr><th>what</th><th class="num">peer</th><th class="num">value</th><th class="num">round</th>'
            '<th class="num">incarnation</th><th class="num">time</th></tr>')
    body = []
    for row in rows[:MAX_TIMELINE_ROWS]:
        cells = [_fmt_count(row.get("peer")), _fmt_count(row.get("value")), _fmt_count(row.get("round")),
                 _fmt_count(row.get("incarnation", 0)), _fmt_seconds(row.get("virtual_time"))]
        body.append(f"<tr><td>{html.escape(str(row.get('metric', '')))}</td>"
                    + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells) + "</tr>")
    more = len(rows) - MAX_TIMELINE_ROWS
    tail = f"\n<p>… and {more} more in summary.json</p>" if more > 0 else ""
    return "<table>\n" + head + "\n" + "\n".join(body) + "\n</table>" + tail


def _fmt_ratio(value: Any) -> str:
    return "—" if not isinstance(value, (int, float)) or math.isnan(value) else f"{value:.4f}"


def _type_table(summary: dict[str, Any]) -> str:
    """Messages and bytes per message type: where an algorithm's traffic goes."""
    messages = summary.get("messages_by_type") or {}
    sent = summary.get("bytes_by_type") or {}
    if not messages:
        return "<p>—</p>"
    total = sum(sent.values()) or 1
    head = ('<tr><th>message type</th><th class="num">messages</th><th class="num">bytes</th>'
            '<th class="num">share of bytes</th></tr>')
    rows = [f'<tr><td>{html.escape(kind)}</td><td class="num">{_fmt_count(messages[kind])}</td>'
            f'<td class="num">{_fmt_count(sent.get(kind))}</td>'
            f'<td class="num">{100 * sent.get(kind, 0) / total:.1f}%</td></tr>' for kind in sorted(messages)]
    return "<table>\n" + head + "\n" + "\n".join(rows) + "\n</table>"


def _peer_status(summary: dict[str, Any], peer: int, dead: set[int]) -> str:
    """The summary's peer_status (finished, stopped, crashed, ...); older summaries: dead or alive."""
    status = (summary.get("peer_status") or {}).get(str(peer))
    if isinstance(status, str) and status:
        return f"{status} (dead)" if peer in dead and status != STATUS_CRASHED else status
    return "dead" if peer in dead else "alive"


def _peer_table(peers: list[int], final: dict[int, float], messages: dict[int, float], sent_bytes: dict[int, float],
                dead: set[int], summary: dict[str, Any] | None = None,
                histories: dict[int, PeerHistory] | None = None) -> str:
    summary = summary or {}
    histories = histories or {}
    incarnations = _per_peer(summary, "incarnations")
    final_round = _per_peer(summary, "final_round")
    head = ('<tr><th class="num">peer</th><th class="num">final global accuracy</th><th class="num">at round</th>'
            '<th class="num">messages sent</th><th class="num">bytes sent</th><th class="num">incarnations</th>'
            '<th class="num">crashes</th><th>status</th></tr>')
    rows = []
    for p in peers:
        status = _peer_status(summary, p, dead)
        cls = ' class="dead"' if p in dead else ' class="stopped"' if status in (STATUS_STOPPED, STATUS_RUNNING) else ""
        lives = incarnations.get(p, histories[p].lives if p in histories else None)
        crashes = len(histories[p].crashes) if p in histories else None
        cells = [str(p), _fmt_acc(final.get(p)), _fmt_count(final_round.get(p)), _fmt_count(messages.get(p)),
                 _fmt_count(sent_bytes.get(p)), _fmt_count(lives), _fmt_count(crashes)]
        tds = "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells) + f"<td>{html.escape(status)}</td>"
        rows.append(f"<tr{cls}>{tds}</tr>")
    return "<table>\n" + head + "\n" + "\n".join(rows) + "\n</table>"


def render_html(title: str, summary_html: str, images: list[str], peer_html: str, config_yaml: str,
                type_html: str = "", interrupted: bool = False, timeline_html: str = "") -> str:
    esc = html.escape(title)
    banner = ('<p class="interrupted">This run was interrupted (Ctrl-C or a signal) before it finished: '
              "what follows is what the peers had recorded until then.</p>")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc}</h1>",
        *([banner] if interrupted else []),
        "<h2>Summary</h2>", summary_html,
        *(["<h2>Timeline</h2>", timeline_html] if timeline_html else []),
        "<h2>Plots</h2>", *images,
        "<h2>Per-peer results</h2>", peer_html,
        *(["<h2>Traffic by message type</h2>", type_html] if type_html else []),
        "<h2>Configuration</h2>", f"<pre>{html.escape(config_yaml)}</pre>",
        "</body></html>", "",
    ])


# --- entry point -----------------------------------------------------------------------------


def write_report(run_dir: Path, events: list[dict], summary: dict, config_yaml: str,
                 title: str = "meshfl run") -> list[Path]:
    """Write the three plots and report.html into run_dir; return the paths written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    events = list(events)
    grids = collect_metrics(events)
    accuracy = grids.get(GLOBAL_ACCURACY, _empty_grid())
    global_loss = grids.get(GLOBAL_LOSS, _empty_grid())
    train_loss = grids.get(TRAIN_LOSS, _empty_grid())
    final = _per_peer(summary, "final_global_accuracy")
    messages = _per_peer(summary, "messages_sent")
    sent_bytes = _per_peer(summary, "bytes_sent")
    dead = _dead_peers(summary)
    histories = peer_histories(events, summary["peers"] if isinstance(summary.get("peers"), int) else 0)
    faults = [e for e in events if isinstance(e, dict) and e.get("event") == FAULT]
    by_round = has_rounds(events)
    time_key = "wall_time" if summary.get("runtime") == "grpc" else "virtual_time"
    accuracy_series = {} if by_round else collect_series(events, GLOBAL_ACCURACY, time_key)
    peers = sorted(set(_all_peers(summary, accuracy)) | set(accuracy_series))
    if title and summary.get("interrupted") and "interrupted" not in title:
        title = f"{title} (interrupted)"

    if by_round or not accuracy_series:
        accuracy_png = plot_accuracy(accuracy, dead, run_dir / "accuracy_per_peer.png", histories)
    else:
        accuracy_png = plot_accuracy_over_time(accuracy_series, dead, run_dir / "accuracy_per_peer.png", histories,
                                               time_key)
    if global_loss.empty and train_loss.empty:
        loss_png = plot_loss_over_time(collect_series(events, GLOBAL_LOSS, time_key), run_dir / "loss_per_round.png",
                                       time_key)
    else:
        loss_png = plot_loss(global_loss, train_loss, run_dir / "loss_per_round.png")
    pngs = [
        accuracy_png,
        plot_messages(peers, messages, sent_bytes, dead, run_dir / "messages_per_peer.png"),
        loss_png,
    ]
    alts = ["global test accuracy per peer", "messages and bytes sent per peer", "loss"]
    for metric, lines in sorted(described_metrics(events).items())[:MAX_DESCRIBED_PLOTS]:
        safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in metric)
        pngs.append(plot_described(metric, lines, run_dir / f"{safe}_per_peer.png"))
        alts.append(f"{metric} per peer")
    resources = plot_resources(events, run_dir / "resources_per_peer.png")
    if resources is not None:
        pngs.append(resources)
        alts.append("CPU and memory per peer process")
    for metric, cells in sorted(matrix_metrics(events).items())[:MAX_DESCRIBED_PLOTS]:
        safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in metric)
        pngs.append(plot_matrix(metric, cells, run_dir / f"{safe}_matrix.png"))
        alts.append(f"{metric}: peer about peer")
    page = render_html(
        title,
        _summary_table(summary, peers, final, messages, sent_bytes, dead, histories, faults),
        [_img(p, alt) for p, alt in zip(pngs, alts, strict=True)],
        _peer_table(peers, final, messages, sent_bytes, dead, summary, histories),
        config_yaml,
        _type_table(summary),
        interrupted=bool(summary.get("interrupted")),
        timeline_html=_timeline_table(summary),
    )
    report = run_dir / "report.html"
    report.write_text(page, encoding="utf-8")
    return [*pngs, report]
