"""Run metrics: one JSON object per line in `metrics.jsonl`, and a loss-curve PNG drawn from it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run rewrites them, so the file equals an uninterrupted run's."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if rec.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training and validation AR / diffusion losses against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [r for r in recs if r.get("kind") == "train"]
    val = [r for r in recs if r.get("kind") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows, style in (("train", train, "-"), ("val", val, "o-")):
        for key, color in (("ar_loss", "C0"), ("diff_loss", "C1")):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, color=color, alpha=0.5 if name == "train" else 1.0, ms=3,
                        label=f"{name} {'AR' if key == 'ar_loss' else 'diffusion'}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(".tmp-" + png_path.name)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)
