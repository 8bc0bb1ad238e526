"""The training plots (pgolf.train.plots) and the bytes chart: SVG files DVC shows offline, drawn
from the run's logs, the same bytes for the same run."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from pgolf.pack.chart import CODE_ROW, bytes_chart
from pgolf.train.plots import line_chart, nice_ticks, write_train_plots

SVG = "{http://www.w3.org/2000/svg}"


def write_logs(out, val: bool = True):
    out.mkdir(parents=True, exist_ok=True)
    log = [{"step": s, "train_loss": 7.0 - s / 10, "lr_matrix": 0.04, "lr_embed": 0.05 * (1 - s / 60)}
           for s in (1, 10, 20, 30)]
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if val:
        (out / "val_log.json").write_text(json.dumps([{"step": 20, "val_bpb": 2.5}, {"step": 30, "val_bpb": 2.25}]))


def test_every_plot_is_an_svg_of_the_logged_points(tmp_path):
    write_logs(tmp_path / "train")
    written = write_train_plots(tmp_path / "train")
    assert [p.name for p in written] == ["train_loss.svg", "learning_rate.svg", "val_bpb.svg"]
    for path in written:
        root = ET.fromstring(path.read_text())  # well-formed, no script, no external reference
        assert root.tag == f"{SVG}svg" and "<script" not in path.read_text() and "http" not in path.read_text().replace(
            "http://www.w3.org/2000/svg", "")
    loss = ET.fromstring(written[0].read_text())
    (line,) = loss.iter(f"{SVG}polyline")
    assert len(line.get("points").split()) == 4
    lr = ET.fromstring(written[1].read_text())
    assert len(list(lr.iter(f"{SVG}polyline"))) == 2 and "Adam embedding" in written[1].read_text()
    first = {p.name: p.read_bytes() for p in written}
    assert {p.name: p.read_bytes() for p in write_train_plots(tmp_path / "train")} == first


def test_without_validation_there_is_no_val_plot_and_without_a_log_none(tmp_path):
    write_logs(tmp_path / "train", val=False)
    assert [p.name for p in write_train_plots(tmp_path / "train")] == ["train_loss.svg", "learning_rate.svg"]
    assert write_train_plots(tmp_path / "empty") == []


def test_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 60) == [0, 20, 40, 60] or nice_ticks(0, 60) == [0, 10, 20, 30, 40, 50, 60]
    ticks = nice_ticks(2.17, 2.57)
    assert ticks[0] <= 2.17 and ticks[-1] >= 2.57 and len(ticks) <= 7
    assert nice_ticks(5, 5)[0] <= 5 <= nice_ticks(5, 5)[-1]
    assert "polyline" in line_chart({"a": [(1, 1.0)]}, "one point", "x", "y")


def test_the_bytes_chart_has_a_code_bar():
    groups = {"mlp": {"compressed_bytes": 100, "raw_bytes": 300}, "attention": {"compressed_bytes": 50, "raw_bytes": 200}}
    svg = bytes_chart(groups, {"compressed_bytes": 90, "raw_bytes": 320}, "artifact 240 bytes")
    ET.fromstring(svg)
    assert CODE_ROW in svg and "90 / 320" in svg and svg.index("mlp") < svg.index(CODE_ROW)
