"""Self-contained HTML report (plots embedded as base64 PNG) for a demo or training run."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Any


def _figure_png(draw) -> str | None:
    """Render a matplotlib drawing function to an <img> tag; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = draw(plt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def line_plot(history: list[dict], keys: list[str], title: str, ylabel: str = "") -> str | None:
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for key in keys:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, label=key, marker="o" if len(xs) < 15 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return fig

    return _figure_png(draw)


def load_heatmaps(history: list[dict]) -> str | None:
    """Expert-load share over training, one heatmap per MoE layer (rows = experts, columns = steps)."""
    layers = sorted({k for r in history for k in r if re.fullmatch(r"load/layer\d+", k)},
                    key=lambda k: int(k.removeprefix("load/layer")))
    if not layers:
        return None

    def draw(plt):
        fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 2.8), squeeze=False)
        for ax, key in zip(axes[0], layers):
            rows = [r[key] for r in history if key in r]
            n = len(rows[0])
            grid = [[row[e] * n for row in rows] for e in range(n)]  # 1.0 = perfectly balanced
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=3, interpolation="nearest")
            ax.set_title(f"MoE {key.removeprefix('load/')}", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
        fig.colorbar(im, ax=axes[0].tolist(), label="load / mean load")
        return fig

    return _figure_png(draw)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.4g}"
    return html.escape(str(c))


def completion_html(text: str) -> str:
    """Show the <think> part visibly apart from the answer."""
    escaped = html.escape(text)
    escaped = re.sub(r"&lt;think&gt;(.*?)(&lt;/think&gt;|$)",
                     lambda m: f'<span class="think">&lt;think&gt;{m.group(1)}{m.group(2)}</span>', escaped,
                     flags=re.S)
    escaped = re.sub(r"&lt;answer&gt;(.*?)&lt;/answer&gt;",
                     lambda m: f'<span class="answer">&lt;answer&gt;{m.group(1)}&lt;/answer&gt;</span>', escaped,
                     flags=re.S)
    return f"<pre>{escaped}</pre>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}pre{background:#f8f8f8;padding:6px;
white-space:pre-wrap;margin:2px 0}.think{color:#777;font-style:italic}.answer{color:#05632b;font-weight:bold}
.plots img{max-width:100%;margin:4px}.muted{color:#777}"""


def render(title: str, sections: list[tuple[str, str]], subtitle: str = "") -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='muted'>{html.escape(subtitle)}</p>{body}</body></html>")
