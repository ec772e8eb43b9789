"""Render a `Comparison` (experiments/compare.py) as PNG plots, ``report.md`` and ``report.html``.

One document, two renderings: the report is built once as a list of blocks (heading, paragraph,
table, image, list) and each block writes itself as markdown and as HTML, so the two cannot drift
apart. The markdown references its PNGs relatively (it reads in a pull request or next to
docs/results.md); the HTML embeds them as base64, because MLflow's artifact viewer shows an HTML
file on its own, where relative links do not resolve.

Plots use matplotlib's object API (``Figure``, never pyplot): no GUI backend, no global state.
No statistics are computed here; every number comes from the `Comparison`.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from datamodules.mp4 import read_mp4
from experiments.compare import Band, Comparison, Summary, Verdict, fmt, safe_name

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
          "tab:gray", "tab:olive", "tab:cyan")  # one per arm, the same in every plot


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _wrap(text: str, width: int = 24) -> str:
    """Break a label into lines of about ``width`` characters after ``, = _ /`` or a space, so
    "objective=rectified_flow_lognorm" breaks between words, not inside them."""
    lines = [""]
    for token in re.split(r"(?<=[,=_/ ])", text):
        if lines[-1] and len(lines[-1]) + len(token) > width:
            lines.append("")
        lines[-1] += token
    return "\n".join(line.strip() for line in lines)


# -- plots --------------------------------------------------------------------------------------


def plot_curves(curves: dict[str, Band | None], key: str, path: Path) -> bool:
    """``key`` (e.g. train/loss) against step: per arm the mean over seeds, shaded from min to max.
    Returns False (and writes nothing) when no arm logged a history."""
    if not any(curves.values()):
        return False
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (label, b) in enumerate(curves.items()):
        if b is None:
            continue
        ax.plot(b.steps, b.mean, color=_color(i), label=f"{label} (n={b.runs})")
        ax.fill_between(b.steps, b.low, b.high, color=_color(i), alpha=0.2, linewidth=0)
    lowest = min(b.low.min() for b in curves.values() if b is not None)
    if lowest > 0 and max(b.high.max() for b in curves.values() if b is not None) / lowest > 20:
        ax.set_yscale("log")  # losses that fall by orders of magnitude
    ax.set(xlabel="step", ylabel=key, title=f"{key}: mean over seeds, band = min–max")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def plot_metric(metric: str, summaries: dict[str, Summary], verdict: Verdict, arm_order: list[str], path: Path) -> None:
    """One bar per arm at the mean, the bootstrap interval as the error bar, each run as a dot;
    the winner (if any) outlined in black."""
    labels = [a for a in arm_order if a in summaries]
    fig = Figure(figsize=(max(4.0, 1.4 * len(labels) + 1.5), 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(labels))
    means = np.array([summaries[a].mean for a in labels])
    below = np.maximum(0, means - [summaries[a].low for a in labels])
    above = np.maximum(0, np.array([summaries[a].high for a in labels]) - means)
    colors = [_color(arm_order.index(a)) for a in labels]
    bars = ax.bar(x, means, yerr=np.stack([below, above]), capsize=6, color=colors, alpha=0.7)
    for i, a in enumerate(labels):
        values = np.array(summaries[a].values)
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(x[i] + jitter, values, color="black", s=12, zorder=3)
        if a == verdict.winner:
            bars[i].set(edgecolor="black", linewidth=2.5)
    better = f"{verdict.direction} is better" if verdict.direction else "direction unknown"
    bottom = min(min(summaries[a].low, *summaries[a].values) for a in labels)
    top = max(max(summaries[a].high, *summaries[a].values) for a in labels)
    if bottom > 0 and top - bottom < 0.2 * top:  # differences would be invisible on bars from 0
        pad = 0.15 * (top - bottom) or 0.05 * top
        ax.set_ylim(bottom - pad, top + pad)
        ax.set_ylabel("axis does not start at 0", fontsize="small")
    ax.set_title(f"{metric} ({better})\n{_wrap(verdict.text(), 60)}", fontsize="medium")
    ax.set_xticks(x, [_wrap(a, 18) for a in labels], fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=100)


def contact_sheet(label: str, videos: list[tuple[str, np.ndarray]], path: Path, max_frames: int = 8) -> None:
    """Rows = videos (``uint8 (T, H, W, 3)`` each, with a row label), columns = frames evenly
    spaced over each video, titled with the arm."""
    cols = max(min(len(frames), max_frames) for _, frames in videos)
    fig = Figure(figsize=(2.4 + 1.1 * cols, 0.7 + 1.1 * len(videos)), layout="constrained")
    axes = fig.subplots(len(videos), cols, squeeze=False)
    for row, (name, frames) in enumerate(videos):
        picks = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int))
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(picks):
                ax.imshow(frames[picks[col]], interpolation="nearest")
                if row == 0:
                    ax.set_title(f"frame {picks[col]}", fontsize="x-small")
            else:
                ax.set_axis_off()
        axes[row][0].set_ylabel(_wrap(name, 30), rotation=0, ha="right", va="center", fontsize="x-small")
    fig.suptitle(label)
    fig.savefig(path, dpi=100)


# -- the document -------------------------------------------------------------------------------


@dataclass
class Heading:
    text: str
    level: int = 2

    def md(self) -> str:
        return f"{'#' * self.level} {self.text}"

    def html(self, folder: Path) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass
class Paragraph:
    text: str

    def md(self) -> str:
        return self.text

    def html(self, folder: Path) -> str:
        return f"<p>{html.escape(self.text)}</p>"


@dataclass
class Bullets:
    items: list[str]

    def md(self) -> str:
        return "\n".join(f"- {item}" for item in self.items)

    def html(self, folder: Path) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in self.items) + "</ul>"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]

    def md(self) -> str:
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        return "\n".join([line(self.header), line(["---"] * len(self.header)), *map(line, self.rows)])

    def html(self, folder: Path) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Image:
    path: str  # relative to the report folder
    alt: str

    def md(self) -> str:
        return f"![{self.alt}]({self.path})"

    def html(self, folder: Path) -> str:
        data = base64.b64encode((folder / self.path).read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(self.alt)}" src="data:image/png;base64,{data}">'


Block = Heading | Paragraph | Bullets | Table | Image

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}"""


def method_text(c: Comparison) -> str:
    b = c.bootstrap
    return (f"Each run contributes the final value of each metric. Per arm: mean ± sample standard deviation "
            f"(ddof = 1; — for one run) and a {b.confidence:.0%} percentile-bootstrap interval of the mean "
            f"({b.resamples:,} resamples of the arm's runs with replacement, numpy default_rng({b.seed})). "
            f"With few seeds the interval is coarse: for n ≤ 3 it is exactly the min–max of the runs. "
            f"A winner is named only where the metric's direction is known, every arm has at least 2 runs and "
            f"one arm's interval lies entirely on the better side of every other arm's; otherwise "
            f"'no separation' (or the reason). Cells read: mean ± std [interval] n=runs.")


def document(c: Comparison, curve_key: str, curve_png: str | None, bar_pngs: dict[str, str],
             sheet_pngs: dict[str, str | None]) -> list[Block]:
    """The report's blocks, in reading order."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = f"parent run {c.parent_run_id}" if c.parent_run_id else "no parent run (whole experiment)"
    blocks: list[Block] = [
        Heading(f"Comparison: {c.title}", 1),
        Paragraph(f"Source {c.source!r}: experiment {c.experiment}, {where}; "
                  f"{sum(len(a.runs) for a in c.arms)} finished runs in {len(c.arms)} arms; written {stamp}."),
        Heading("Arms"),
        Table(["arm", "axes", "seeds", "runs"],
              [[a.label, ", ".join(f"{k}={v}" for k, v in a.axes.items()), ", ".join(a.seeds),
                ", ".join(r.run_id[:8] for r in a.runs)] for a in c.arms]),
        Heading("Method"),
        Paragraph(method_text(c)),
        Heading("Results"),
    ]
    header, rows = c.table()
    blocks.append(Table(header, rows) if rows else Paragraph("No metric to compare."))
    if c.constants:
        blocks += [Heading("Model card (constant per configuration, not judged)"),
                   Table(["metric", *(a.label for a in c.arms)],
                         [[m, *(_constant(per_arm.get(a.label, ())) for a in c.arms)]
                          for m, per_arm in c.constants.items()])]
    if curve_png:
        blocks += [Heading("Curves"), Image(curve_png, curve_key)]
    if bar_pngs:
        blocks.append(Heading("Metrics"))
        blocks += [Image(png, metric) for metric, png in bar_pngs.items()]
    blocks.append(Heading("Samples"))
    for arm in c.arms:
        png = sheet_pngs.get(arm.label)
        blocks.append(Image(png, arm.label) if png else Paragraph(f"{arm.label}: no sample videos logged."))
    if c.notes:
        blocks += [Heading("Notes"), Bullets(c.notes)]
    return blocks


def _constant(values: tuple[float, ...]) -> str:
    """One value when the arm's runs agree (the usual case), else all of them."""
    if not values:
        return "—"
    distinct = list(dict.fromkeys(values))
    return fmt(distinct[0]) if len(distinct) == 1 else " / ".join(fmt(v) for v in values)


def _unique(stem: str, index: int, taken: Iterable[str | None]) -> str:
    """``stem.png``, or ``stem_<index>.png`` if two names made file-safe collide. Names do not
    carry positions, so re-running with other metrics overwrites rather than piles up files."""
    return f"{stem}_{index}.png" if f"{stem}.png" in set(taken) else f"{stem}.png"


def write_report(c: Comparison, folder: Path, curves: dict[str, Band | None],
                 samples: dict[str, list[tuple[str, Path]]], curve_key: str = "train/loss") -> Path:
    """Write the plots, ``report.md`` and ``report.html`` into ``folder``; returns report.md's path.

    ``curves``: arm label -> `Band` of ``curve_key`` (or None); ``samples``: arm label -> (row
    label, local mp4) from `experiments.compare.download_samples`. If ``folder`` holds an earlier
    report (a report.md), its PNGs are removed first, so the folder is this report only.
    """
    earlier = (folder / "report.md").exists()
    for sub in ("metrics", "samples"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for old in (folder / sub).glob("*.png") if earlier else ():
            old.unlink()
    arm_order = [a.label for a in c.arms]
    curve_png: str | None = f"{safe_name(curve_key)}.png"
    if not plot_curves(curves, curve_key, folder / curve_png):
        curve_png = None
    bar_pngs: dict[str, str] = {}
    for i, (metric, summaries) in enumerate(c.summaries.items()):
        bar_pngs[metric] = _unique(f"metrics/{safe_name(metric)}", i, bar_pngs.values())
        plot_metric(metric, summaries, c.verdicts[metric], arm_order, folder / bar_pngs[metric])
    sheet_pngs: dict[str, str | None] = {}
    for i, arm in enumerate(c.arms):
        videos = [(name, read_mp4(path)) for name, path in samples.get(arm.label, [])]
        sheet_pngs[arm.label] = _unique(f"samples/{safe_name(arm.label)}", i, sheet_pngs.values()) if videos else None
        if videos:
            contact_sheet(arm.label, videos, folder / sheet_pngs[arm.label])
    blocks = document(c, curve_key, curve_png, bar_pngs, sheet_pngs)
    (folder / "report.md").write_text("\n\n".join(b.md() for b in blocks) + "\n")
    body = "\n".join(b.html(folder) for b in blocks)
    (folder / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(c.title)}</title>"
        f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
    return folder / "report.md"
