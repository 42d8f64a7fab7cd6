"""Plots and the HTML page of a sweep or a comparison (see sweep.py), in report.py's style:
matplotlib's object API on Agg, labelled axes with units, one colour and marker per point,
bands = min..max over seeds when a point has more than one finished seed."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from meshfl.experiment.report import _CSS, _accuracy_ylim, _img, _new_figure, _no_data, _save
from meshfl.experiment.sweep import MB, OK, STATS, Results, fmt, is_number, parse_value

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
BAND_ALPHA = 0.15


@dataclass
class Curves:
    """One point's per-round figures over its finished seeds: (seeds, rounds) arrays, NaN where missing."""

    label: str
    rounds: np.ndarray
    accuracy: np.ndarray
    time_s: np.ndarray
    mb: np.ndarray
    mb_estimated: bool  # some seed had no per-round bytes: its total was spread evenly over its rounds
    over_time: list[tuple[np.ndarray, np.ndarray]]  # runs without rounds: (t, mean accuracy) per seed

    @property
    def seeds(self) -> int:
        return self.accuracy.shape[0]


def point_curves(point: dict[str, Any], label: str) -> Curves:
    runs = [r for r in point["runs"] if r.get("status") == OK]
    rounds = np.asarray(sorted({rnd for r in runs for rnd in r.get("rounds") or []}), dtype=float)
    shape = (len(runs), rounds.size)
    accuracy, time_s, mb = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    estimated = False
    over_time = []
    for i, run in enumerate(runs):
        run_rounds = run.get("rounds") or []
        if not run_rounds:
            pts = run.get("accuracy_over_time") or []
            if pts:
                over_time.append((np.asarray([p[0] for p in pts]), np.asarray([p[1] for p in pts])))
            continue
        cols = np.searchsorted(rounds, run_rounds)
        accuracy[i, cols] = [np.nan if v is None else v for v in run["accuracy_per_round"]]
        time_s[i, cols] = run["round_time_s"]
        if run.get("cumulative_bytes") is not None:
            mb[i, cols] = np.asarray(run["cumulative_bytes"], dtype=float) / MB
        elif isinstance(run.get("total_bytes"), (int, float)):
            estimated = True
            last = max(run_rounds)
            mb[i, cols] = run["total_bytes"] / MB * np.asarray(run_rounds, dtype=float) / last
    return Curves(label, rounds, accuracy, time_s, mb, estimated, over_time)


def _nan_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, min, max) over axis 0, NaN for a column with no value (no warning)."""
    have = np.isfinite(values)
    count = have.sum(axis=0)
    total = np.where(have, values, 0.0).sum(axis=0)
    mean = np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)
    low = np.where(count > 0, np.min(np.where(have, values, np.inf), axis=0), np.nan)
    high = np.where(count > 0, np.max(np.where(have, values, -np.inf), axis=0), np.nan)
    return mean, low, high


def _style(i: int, n: int = 1) -> dict[str, Any]:
    """Colour, marker and line style of the i-th of n lines: earlier lines are wider and their hollow
    markers larger, so lines that coincide (equal results) all stay visible."""
    wide = (n - 1 - i) / max(1, n - 1)
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)], "mfc": "none", "mew": 1.4,
            "ls": "-" if i < len(PALETTE) else "--", "lw": 1.3 + 2.2 * wide, "ms": 5 + 5 * wide}


def _legend(ax: Any, title: str, bands: bool, seeds: int, extra: list[Any] | None = None) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if bands:
        handles.append(Patch(color="#888888", alpha=0.3, label=f"min-max over {seeds} seeds"))
    handles += extra or []
    ax.legend(handles=handles, title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title_fontsize=8, frameon=False)


def _legend_title(results: Results) -> str:
    return ", ".join(results.keys)


def _short_labels(results: Results) -> list[str]:
    """Legend entries: the values only (the keys are the legend's title)."""
    return [", ".join(str(p["raw_values"][k]) for k in results.keys) or p["label"] for p in results.points]


def _seeds_note(curves: list[Curves]) -> tuple[bool, int]:
    most = max((c.seeds for c in curves), default=0)
    return most > 1, most


def plot_accuracy_per_round(results: Results, curves: list[Curves], path: Path) -> Path:
    fig = _new_figure(9.0, 4.8)
    ax = fig.add_subplot()
    drawn = [c for c in curves if c.rounds.size]
    if not drawn:
        _no_data(ax, "accuracy per round")
        return _save(fig, path)
    bands, seeds = _seeds_note(drawn)
    values = []
    for i, c in enumerate(curves):
        if not c.rounds.size:
            continue
        mean, low, high = _nan_stats(c.accuracy)
        style = _style(i, len(curves))
        ax.plot(c.rounds, mean, label=c.label, **style)
        if c.seeds > 1:
            ax.fill_between(c.rounds, low, high, color=style["color"], alpha=BAND_ALPHA, lw=0)
        values.append(np.concatenate([low, high, mean]))
    ax.set_ylim(*_accuracy_ylim(np.concatenate(values)))
    ax.set_xlabel("round")
    ax.set_ylabel("global test accuracy\n(mean over live peers)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.set_title("Global test accuracy per round" + (f" (mean over {seeds} seeds)" if bands else ""))
    _legend(ax, _legend_title(results), bands, seeds)
    return _save(fig, path)


def plot_accuracy_over(results: Results, curves: list[Curves], path: Path, axis: str) -> Path:
    """Accuracy against virtual seconds (axis="time") or cumulative MB sent (axis="bytes")."""
    fig = _new_figure(9.0, 4.8)
    ax = fig.add_subplot()
    drawn = [c for c in curves if c.rounds.size or (axis == "time" and c.over_time)]
    if not drawn:
        _no_data(ax, "accuracy per round")
        return _save(fig, path)
    bands, seeds = _seeds_note(drawn)
    values = []
    estimated = False
    for i, c in enumerate(curves):
        style = _style(i, len(curves))
        if not c.rounds.size:
            if axis == "time":
                for j, (t, acc) in enumerate(c.over_time):
                    ax.plot(t, acc, lw=1.4, color=style["color"], label=c.label if j == 0 else None)
                    values.append(acc)
            continue
        x, _, _ = _nan_stats(c.time_s if axis == "time" else c.mb)
        estimated = estimated or (axis == "bytes" and c.mb_estimated)
        mean, low, high = _nan_stats(c.accuracy)
        ax.plot(x, mean, label=c.label, **style)
        if c.seeds > 1:
            ax.fill_between(x, low, high, color=style["color"], alpha=BAND_ALPHA, lw=0)
        values.append(np.concatenate([low, high, mean]))
    ax.set_ylim(*_accuracy_ylim(np.concatenate(values)))
    ax.set_xlim(left=0)
    if axis == "time":
        ax.set_xlabel("virtual time (s) at the end of each round")
        what = "virtual time"
    else:
        ax.set_xlabel("cumulative MB sent by all peers" +
                      (" (estimated where a run lacks per-round counts:\nits total spread evenly over its rounds)" if estimated else ""))
        what = "traffic"
    ax.set_ylabel("global test accuracy\n(mean over live peers)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Global test accuracy over {what}" + (f" (x and y: mean over {seeds} seeds)" if bands else ""))
    _legend(ax, _legend_title(results), bands, seeds)
    return _save(fig, path)


def _numeric_axis(ax: Any, x: np.ndarray, key: str) -> None:
    ax.set_xlabel(key)
    positive = x[x > 0]
    if positive.size == x.size and x.size > 2 and positive.max() / positive.min() >= 50:
        ax.set_xscale("log")
    if np.all(np.equal(np.mod(x, 1), 0)) and x.size <= 12:
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" for v in x])
    ax.grid(True, alpha=0.3)


def plot_final_accuracy_vs(results: Results, key: str, path: Path) -> Path:
    fig = _new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    order = sorted(range(len(results.points)), key=lambda i: float(parse_value(results.points[i]["raw_values"][key])))
    x = np.asarray([float(parse_value(results.points[i]["raw_values"][key])) for i in order])
    seeds = max(p["aggregate"]["seeds"] for p in results.points)
    values = []
    for name, label, style in (("mean_final_accuracy", "mean over peers", _style(0, 2)),
                               ("min_final_accuracy", "worst peer", {**_style(1, 2), "color": PALETTE[3], "ls": "--"})):
        stats = [results.points[i]["aggregate"][name] for i in order]
        mean = np.asarray([np.nan if s["mean"] is None else s["mean"] for s in stats])
        low = np.asarray([np.nan if s["min"] is None else s["min"] for s in stats])
        high = np.asarray([np.nan if s["max"] is None else s["max"] for s in stats])
        ax.plot(x, mean, label=label + (f" (mean of {seeds} seeds)" if seeds > 1 else ""), **style)
        if seeds > 1:
            ax.fill_between(x, low, high, color=style["color"], alpha=BAND_ALPHA, lw=0)
        values.append(np.concatenate([mean, low, high]))
    _numeric_axis(ax, x, key)
    ax.set_ylim(*_accuracy_ylim(np.concatenate(values)))
    ax.set_ylabel("final global test accuracy")
    ax.set_title(f"Final accuracy against {key}")
    _legend(ax, "final accuracy", seeds > 1, seeds)
    return _save(fig, path)


def plot_round_duration_vs(results: Results, key: str, path: Path) -> Path:
    fig = _new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    order = sorted(range(len(results.points)), key=lambda i: float(parse_value(results.points[i]["raw_values"][key])))
    x = np.asarray([float(parse_value(results.points[i]["raw_values"][key])) for i in order])
    rounds = sorted({r for i in order for r in results.points[i]["aggregate"]["rounds"]})
    if not rounds:
        _no_data(ax, "rounds")
        return _save(fig, path)
    seeds = max(results.points[i]["aggregate"]["seeds"] for i in order)
    many = len(rounds) > 8
    cmap = None
    if many:
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
    for j, rnd in enumerate(rounds):
        y = []
        for i in order:
            agg = results.points[i]["aggregate"]
            means = agg["round_durations_s"]["mean"]
            k = agg["rounds"].index(rnd) if rnd in agg["rounds"] else None
            y.append(np.nan if k is None or means[k] is None else means[k])
        if many and cmap is not None:
            color = cmap(j / max(1, len(rounds) - 1))
            ax.plot(x, y, color=color, lw=1.2, marker=".", ms=4)
        else:
            ax.plot(x, y, label=f"round {rnd}", **_style(j, len(rounds)))
    _numeric_axis(ax, x, key)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("round duration (virtual s)")
    ax.set_title(f"Duration of each round against {key}" + (f" (mean over {seeds} seeds)" if seeds > 1 else ""))
    if many and cmap is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar = fig.colorbar(ScalarMappable(norm=Normalize(min(rounds), max(rounds)), cmap=cmap), ax=ax)
        bar.set_label("round")
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def numeric_key(results: Results) -> str | None:
    """The grid key to plot against: exactly one key, every value a number, more than one point."""
    if results.kind != "sweep" or len(results.keys) != 1 or len(results.points) < 2:
        return None
    key = results.keys[0]
    if all(is_number(parse_value(p["raw_values"][key])) for p in results.points):
        return key
    return None


def file_key(key: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)


def write_plots(results: Results, out: Path) -> list[Path]:
    labels = _short_labels(results)
    curves = [point_curves(p, label) for p, label in zip(results.points, labels, strict=True)]
    pngs = [plot_accuracy_per_round(results, curves, out / "accuracy_per_round.png"),
            plot_accuracy_over(results, curves, out / "accuracy_over_time.png", "time"),
            plot_accuracy_over(results, curves, out / "accuracy_over_bytes.png", "bytes")]
    key = numeric_key(results)
    if key is not None:
        pngs.append(plot_final_accuracy_vs(results, key, out / f"final_accuracy_vs_{file_key(key)}.png"))
        pngs.append(plot_round_duration_vs(results, key, out / f"round_duration_vs_{file_key(key)}.png"))
    return pngs


# ---- HTML ---------------------------------------------------------------------------------

_EXTRA_CSS = "td.fail { background: #fde2e2; color: #8a1f1f; }\n"


def _table_html(header: list[str], rows: list[list[Any]], keys: list[str]) -> str:
    head = "".join(f'<th{"" if i < len(keys) else " class=num"}>{html.escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = [f"<td>{html.escape(str(v))}</td>" for v in row[:len(keys)]]
        cells += [f'<td class="num">{html.escape(fmt(v, name))}</td>' for v, name in zip(row[len(keys):], header[len(keys):], strict=True)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>\n<tr>" + head + "</tr>\n" + "\n".join(body) + "\n</table>"


def _runs_html(results: Results) -> str:
    head = ('<tr><th>point</th><th class="num">seed</th><th>status</th><th class="num">mean final acc</th>'
            '<th class="num">min final acc</th><th class="num">virtual s</th><th class="num">MB</th><th>report</th></tr>')
    rows = []
    for point in results.points:
        for run in point["runs"]:
            ok = run.get("status") == OK
            status = run.get("status", "?") + (f": {run['error']}" if run.get("error") else "")
            link = f'<a href="{html.escape(run["run_dir"])}/report.html">{html.escape(run["run_dir"])}</a>' if ok else ""
            mb = run["total_bytes"] / MB if ok and isinstance(run.get("total_bytes"), (int, float)) else None
            cells = [fmt(run.get("mean_final_accuracy"), "accuracy"), fmt(run.get("min_final_accuracy"), "accuracy"),
                     fmt(run.get("virtual_time_s"), "s"), fmt(mb, "mb")]
            rows.append(f"<tr><td>{html.escape(point['label'])}</td><td class=\"num\">{html.escape(str(run.get('seed')))}</td>"
                        f"<td{'' if ok else ' class=fail'}>{html.escape(status)}</td>"
                        + "".join(f'<td class="num">{html.escape(c)}</td>' for c in cells) + f"<td>{link}</td></tr>")
    return "<table>\n" + head + "\n" + "\n".join(rows) + "\n</table>"


def render_page(results: Results, header: list[str], rows: list[list[Any]], pngs: list[Path]) -> str:
    meta = results.meta
    if results.kind == "sweep":
        title = f"meshfl sweep: {meta.get('name', '')}"
        facts = [f"config: {meta.get('config') or '(defaults)'}",
                 f"--set: {' '.join(meta.get('overrides') or []) or '(none)'}",
                 "grid: " + (" x ".join(f"{k} in {{{', '.join(v)}}}" for k, v in
                                        ((k, [str(p['raw_values'][k]) for p in results.points]) for k in results.keys))
                             if results.keys else "(none)"),
                 f"seeds: {', '.join(map(str, meta.get('seeds') or []))}",
                 f"runs: {len(results.runs)} ({sum(r.get('status') == OK for r in results.runs)} finished)"]
    else:
        title = "meshfl compare"
        facts = [f"run folders: {', '.join(meta.get('run_dirs') or [])}"]
    banner = ('<p class="interrupted">This sweep was interrupted (Ctrl-C) before every run finished: the table and '
              "plots hold the runs that did.</p>") if results.interrupted else ""
    stats_note = ("<p>Each row: mean and sample standard deviation over the seeds that finished (std empty with one "
                  f"seed) of {', '.join(STATS)}; MB = 10<sup>6</sup> bytes.</p>")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}{_EXTRA_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        banner,
        "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>",
        "<h2>Table</h2>", _table_html(header, rows, results.keys), stats_note,
        "<h2>Plots</h2>", *[_img(p, p.stem.replace("_", " ")) for p in pngs],
        "<h2>Runs</h2>", _runs_html(results),
        "</body></html>", "",
    ])

