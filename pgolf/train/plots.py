"""The training run's plots as small deterministic SVGs: train loss, learning rates and (with
train.val_every) val bpb by step. No plotting library and no script, so `dvc plots show` draws
them offline; the numbers come from train_log.jsonl and val_log.json, so the same run gives the
same bytes. Only the pipeline's train stage draws them: an exported train_gpt.py does not carry
this module (pgolf.pack.single_file.PIPELINE_ONLY)."""
from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

PLOTS_DIR = "plots"
COLOURS = ("#2171b5", "#d94801", "#238b45", "#6a51a3")
WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 72, 24, 44, 48


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 0.5:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.001:
        return f"{value:.3g}"
    return f"{value:.4g}"


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str) -> str:
    """One SVG of `series` (name -> (x, y) points), on shared axes with round ticks and a legend."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + plot_w * (x - x0) / ((x1 - x0) or 1.0)

    def py(y: float) -> float:
        return TOP + plot_h * (1 - (y - y0) / ((y1 - y0) or 1.0))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" '
             'font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{escape(title)}</text>']
    for y in y_ticks:
        parts += [f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{WIDTH - RIGHT}" y2="{py(y):.1f}" stroke="#e5e5e5"/>',
                  f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_label(y)}</text>']
    for x in x_ticks:
        parts += [f'<line x1="{px(x):.1f}" y1="{TOP + plot_h}" x2="{px(x):.1f}" y2="{TOP + plot_h + 4}" stroke="#666"/>',
                  f'<text x="{px(x):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{_label(x)}</text>']
    parts += [f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" stroke="#666"/>',
              f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#666"/>',
              f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">{escape(x_label)}</text>',
              f'<text transform="translate(16 {TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
              f'{escape(y_label)}</text>']
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in values if math.isfinite(y))
        if path:
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(values) == 1:
            x, y = values[0]
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        legend_y = TOP + 14 + 16 * i
        parts += [f'<line x1="{WIDTH - RIGHT - 150}" y1="{legend_y - 4}" x2="{WIDTH - RIGHT - 130}" y2="{legend_y - 4}" '
                  f'stroke="{colour}" stroke-width="2"/>',
                  f'<text x="{WIDTH - RIGHT - 124}" y="{legend_y}">{escape(name)}</text>']
    parts.append("</svg>\n")
    return "\n".join(parts)


def write_train_plots(out: Path, train_log: str = "train_log.jsonl", val_log: str = "val_log.json") -> list[Path]:
    """The run's plots into out/plots/ from its logs there; returns the files written."""
    out = Path(out)
    log_path = out / train_log
    if not log_path.is_file():
        return []
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    folder = out / PLOTS_DIR
    folder.mkdir(exist_ok=True)
    charts = {
        "train_loss.svg": line_chart({"train loss": [(r["step"], r["train_loss"]) for r in log]},
                                     "train loss", "step", "loss (nats per token)"),
        "learning_rate.svg": line_chart({"Muon matrices": [(r["step"], r["lr_matrix"]) for r in log],
                                         "Adam embedding": [(r["step"], r["lr_embed"]) for r in log]},
                                        "learning rate", "step", "lr"),
    }
    if (out / val_log).is_file():
        val = json.loads((out / val_log).read_text())
        charts["val_bpb.svg"] = line_chart({"val bpb": [(r["step"], r["val_bpb"]) for r in val]},
                                           "val bpb (live weights)", "step", "bits per byte")
    written = []
    for name, svg in charts.items():
        (folder / name).write_text(svg, encoding="utf-8")
        written.append(folder / name)
    return written
