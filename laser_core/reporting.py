"""Plain Markdown tables for reports, artifact visualizations and the README (no extra dependency)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field


def full_ranking_protocol(users: int, **extra: object) -> dict:
    """The evaluation protocol of a pipeline test report: leave-one-out, full ranking, no history masking."""
    return {
        "ranking": "full, over all items",
        "mask_history": False,
        "split": "leave-one-out",
        "users": int(users),
        **extra,
    }


def _cell(value: object) -> str:
    if isinstance(value, float):
        text = f"{value:.4f}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _esc(text: object) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    width: int = 560,
    height: int = 300,
) -> str:
    """A self-contained HTML page with an SVG line chart (one polyline per series; points marked)."""
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
    pts = [p for s in series.values() for p in s]
    left, right, top, bottom = 60, 20, 30, 45
    body = []
    if pts:
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
        sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
        sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
        for i in range(5):
            yv = y0 + (y1 - y0) * i / 4
            body.append(
                f'<line x1="{left}" x2="{width - right}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" '
                f'stroke="#ddd"/><text x="{left - 6}" y="{sy(yv) + 4:.1f}" font-size="11" '
                f'text-anchor="end">{yv:.4f}</text>'
            )
        for xv in sorted({p[0] for p in pts}):
            body.append(
                f'<text x="{sx(xv):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle">{xv:g}</text>'
            )
        for n, (name, s) in enumerate(series.items()):
            c = colors[n % len(colors)]
            if s:
                path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
                body.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{path}"/>')
                body += [
                    f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"><title>{_esc(name)} '
                    f"{x:g}: {y:.4f}</title></circle>"
                    for x, y in s
                ]
            body.append(
                f'<text x="{width - right - 4}" y="{top + 14 * n}" font-size="12" fill="{c}" '
                f'text-anchor="end">{_esc(name)}</text>'
            )
    else:
        body.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text>')
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
        f'<text x="{width / 2}" y="18" font-size="14" text-anchor="middle">{_esc(title)}</text>'
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#333"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#333"/>'
        f'<text x="{width / 2}" y="{height - 8}" font-size="12" text-anchor="middle">{_esc(x_label)}</text>'
        f'<text x="14" y="{height / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {height / 2})">{_esc(y_label)}</text>{"".join(body)}</svg>'
    )
    return f"<html><body>{svg}</body></html>"


def svg_bar_chart(
    values: Sequence[float], labels: Sequence[str], title: str, y_label: str, width: int = 560, height: int = 280
) -> str:
    """A self-contained HTML page with an SVG bar chart (e.g. how often each expert was selected)."""
    left, right, top, bottom = 60, 20, 30, 45
    top_v = max([float(v) for v in values] + [1e-12])
    n = max(len(values), 1)
    slot = (width - left - right) / n
    body = []
    for i, (v, lab) in enumerate(zip(values, labels)):
        h = float(v) / top_v * (height - top - bottom)
        x = left + i * slot + slot * 0.15
        body.append(
            f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
            f'fill="#1f77b4"><title>{_esc(lab)}: {v}</title></rect>'
            f'<text x="{x + slot * 0.35:.1f}" y="{height - bottom + 16}" font-size="11" '
            f'text-anchor="middle">{_esc(lab)}</text>'
            f'<text x="{x + slot * 0.35:.1f}" y="{height - bottom - h - 4:.1f}" font-size="10" '
            f'text-anchor="middle">{v:g}</text>'
        )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
        f'<text x="{width / 2}" y="18" font-size="14" text-anchor="middle">{_esc(title)}</text>'
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#333"/>'
        f'<text x="14" y="{height / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {height / 2})">{_esc(y_label)}</text>{"".join(body)}</svg>'
    )
    return f"<html><body>{svg}</body></html>"


@dataclass
class MetricsReport:
    """Test (or validation) metrics of one model, with how they were measured; JSON round-trip."""

    model: str
    split: str
    metrics: dict[str, float]
    protocol: dict = field(default_factory=dict)  # ranking, mask_history, users evaluated
    details: dict = field(default_factory=dict)  # trainable parameters, expert usage, backbone, ...

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "MetricsReport":
        return cls(
            **{k: raw[k] for k in ("model", "split", "metrics")},
            protocol=raw.get("protocol", {}),
            details=raw.get("details", {}),
        )

    def headline(self, keys: Sequence[str] = ("recall@10", "ndcg@10", "mrr")) -> dict[str, float]:
        return {k: float(self.metrics[k]) for k in keys if k in self.metrics}

    def to_markdown(self) -> str:
        keys = sorted(self.metrics, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 10**6))
        text = f"# {self.model}: {self.split} metrics\n\n"
        text += markdown_table(["metric", "value"], [(k, float(self.metrics[k])) for k in keys])
        if self.protocol:
            text += "\n" + markdown_table(["protocol", "value"], sorted(self.protocol.items()))
        return text
