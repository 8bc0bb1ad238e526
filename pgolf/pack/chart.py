"""A bar chart of the artifact's bytes by tensor group and the code, as a small deterministic SVG (no
plotting library, no script: `dvc plots show` draws it offline)."""
from __future__ import annotations

from html import escape

CODE_ROW = "code (train_gpt.py)"


def bytes_chart(groups: dict[str, dict[str, int]], code: dict[str, int], title: str) -> str:
    """`code`: the counted script's compressed_bytes (what the artifact's total counts) and raw_bytes
    (the script as text), drawn in its own colour beside the model's groups."""
    rows = sorted(groups.items(), key=lambda kv: -kv[1]["compressed_bytes"]) + [(CODE_ROW, code)]
    width, bar_left, bar_width, row_h = 720, 150, 420, 28
    top = 48
    height = top + row_h * len(rows) + 24
    largest = max((g["raw_bytes"] for _, g in rows), default=1) or 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="13">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="12" y="24" font-size="15" font-weight="bold">{escape(title)}</text>',
             f'<text x="{bar_left}" y="40" fill="#666">light: raw bytes, dark: compressed alone (code: as counted)</text>']
    for i, (name, g) in enumerate(rows):
        y = top + i * row_h
        light, dark = ("#fdd0a2", "#d94801") if name == CODE_ROW else ("#c6dbef", "#2171b5")
        raw_w = bar_width * g["raw_bytes"] / largest
        comp_w = bar_width * g["compressed_bytes"] / largest
        parts += [f'<text x="12" y="{y + 17}">{escape(name)}</text>',
                  f'<rect x="{bar_left}" y="{y + 4}" width="{raw_w:.1f}" height="18" fill="{light}"/>',
                  f'<rect x="{bar_left}" y="{y + 4}" width="{comp_w:.1f}" height="18" fill="{dark}"/>',
                  f'<text x="{bar_left + raw_w + 6:.1f}" y="{y + 17}">{g["compressed_bytes"]:,} / {g["raw_bytes"]:,}</text>']
    parts.append("</svg>\n")
    return "\n".join(parts)
