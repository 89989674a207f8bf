"""A static HTML results page: the per-class IoU table (and the scale-set sweep) and a grid per dumped image.

The page lives in the dump folder and links the PNGs by relative path, so the folder can be copied as a whole.
"""
from __future__ import annotations

import html
import math
import os
from typing import Any

from utils.files import atomic_write_text

# Column order of an image's row; other kinds (per-scale maps) follow in name order.
KIND_ORDER = ("input", "gt", "pred", "overlay", "error", "conf")

STYLE = """
body { font-family: sans-serif; margin: 1em; }
table.metrics { border-collapse: collapse; margin-bottom: 1.5em; }
table.metrics td, table.metrics th { border: 1px solid #bbb; padding: 2px 8px; text-align: right; }
table.metrics td:nth-child(2), table.metrics th:nth-child(2) { text-align: left; }
div.sample { margin-bottom: 1.5em; }
div.grid { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; }
figure img { width: 256px; display: block; }
figcaption { font-size: 12px; text-align: center; }
"""


def percent(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _metrics_table(metrics: dict[str, Any]) -> str:
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in ("id", "class", "IoU", "precision", "recall", "TP", "FP", "FN"))
    head += "</tr>"
    rows = [
        f"<tr><td>{r['id']}</td><td>{html.escape(r['name'])}</td><td>{percent(r['iou'])}</td>"
        f"<td>{percent(r['precision'])}</td><td>{percent(r['recall'])}</td><td>{r['tp']}</td><td>{r['fp']}</td>"
        f"<td>{r['fn']}</td></tr>"
        for r in metrics["per_class"]
    ]
    summary = (f"<p>mIoU <b>{percent(metrics['miou'])}</b>, pixel accuracy {percent(metrics['acc'])}, mean class accuracy "
               f"{percent(metrics['acc_cls'])}, frequency-weighted IoU {percent(metrics['fwavacc'])}</p>")
    return summary + f"<table class='metrics'>{head}{''.join(rows)}</table>"


def _sweep_table(sweep: dict[str, Any]) -> str:
    head = ("<tr><th>set</th><th>fusion</th><th>flip</th><th>mIoU</th><th>gain</th>"
            + "".join(f"<th>{html.escape(n)}</th>" for n in sweep["classes"]) + "</tr>")
    rows = []
    for r in sweep["rows"]:
        scales = ",".join(f"{s:g}" for s in sorted(r["scales"]))
        gains = "".join(f"<td>{g:+.2f}</td>" if not math.isnan(g) else "<td>-</td>" for g in r["gain"])
        rows.append(f"<tr><td>[{scales}]</td><td>{r['fusion']}</td><td>{'yes' if r['flip'] else 'no'}</td>"
                    f"<td>{percent(r['miou'])}</td><td>{r['miou_gain']:+.2f}</td>{gains}</tr>")
    return (f"<h2>Scale-set sweep</h2><p>gain: IoU points over {html.escape(sweep['baseline'])}</p>"
            f"<table class='metrics'>{head}{''.join(rows)}</table>")


def _kinds(files: dict[str, str]) -> list[str]:
    first = [k for k in KIND_ORDER if k in files]
    return first + sorted(k for k in files if k not in KIND_ORDER)


def write_results_page(
    path: str,
    title: str,
    images: list[dict[str, Any]],
    metrics: dict[str, Any] | None = None,
    sweep: dict[str, Any] | None = None,
) -> str:
    """Write `path`: the metrics table (if labelled), the sweep table (if any) and, per image entry
    ({'name', 'score', 'files': {kind: path}}), one grid of its pictures linked to the full-size files."""
    folder = os.path.dirname(os.path.abspath(path))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if metrics is not None:
        parts.append(_metrics_table(metrics))
    if sweep is not None:
        parts.append(_sweep_table(sweep))
    parts.append(f"<h2>Images ({len(images)})</h2>")
    for entry in images:
        score = entry.get("score")
        caption = html.escape(entry["name"]) + (f" &mdash; image mIoU {percent(score)}" if score is not None
                                                and not math.isnan(score) else "")
        cells = []
        for kind in _kinds(entry["files"]):
            rel = html.escape(os.path.relpath(os.path.abspath(entry["files"][kind]), folder))
            cells.append(f"<figure><a href='{rel}'><img src='{rel}' alt='{html.escape(kind)}'></a>"
                         f"<figcaption>{html.escape(kind)}</figcaption></figure>")
        parts.append(f"<div class='sample'><h3>{caption}</h3><div class='grid'>{''.join(cells)}</div></div>")
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))  # a full disk leaves the previous page, not half of this one
    return path
