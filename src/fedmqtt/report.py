"""``fedmqtt report RUN``: a PNG of a recorded run (see :mod:`fedmqtt.recording`): accuracy and version over
time, the staleness of accepted updates, and each agent's accepted updates against its speed."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fedmqtt.errors import ConfigError


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _floats(rows: list[dict[str, str]], key: str) -> list[float | None]:
    return [float(r[key]) if r.get(key) not in (None, "") else None for r in rows]


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the run in ``run`` to ``out`` (default ``run/report.png``); returns its path."""
    run = Path(run)
    metrics_file = run / "metrics.csv"
    if not metrics_file.is_file():
        raise ConfigError(f"{run} holds no recorded run (no metrics.csv; record one with --record {run})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("fedmqtt report draws with matplotlib: pip install 'fedmqtt[bench]'") from exc
    rows = _rows(metrics_file)
    if not rows:
        raise ConfigError(f"{metrics_file} has no readings yet")
    summary: dict[str, Any] = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    agents = _rows(run / "agents.csv") if (run / "agents.csv").is_file() else []

    fig, axes = plt.subplots(1, 3 if agents else 2, figsize=(15 if agents else 10, 4))
    t = _floats(rows, "seconds")
    ax = axes[0]
    acc = _floats(rows, "accuracy")
    ax.plot([x for x, a in zip(t, acc, strict=True) if a is not None], [a for a in acc if a is not None],
            color="tab:blue", label="accuracy")
    ax.set_xlabel("seconds")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(t, _floats(rows, "version"), color="tab:gray", linestyle="--", label="version")
    twin.set_ylabel("global version")
    ax.set_title("accuracy and version")

    ax = axes[1]
    hist = (summary.get("last_metrics") or {}).get("staleness_hist") or {}
    if hist:
        keys = sorted(hist, key=int)
        ax.bar([int(k) for k in keys], [hist[k] for k in keys], color="tab:orange")
        ax.set_xlabel("staleness (versions behind)")
        ax.set_ylabel("accepted updates")
        ax.set_title("staleness of accepted updates")
    else:
        ax.plot(t, _floats(rows, "staleness_mean"), color="tab:orange")
        ax.set_xlabel("seconds")
        ax.set_ylabel("mean staleness")
        ax.set_title("staleness")

    if agents:
        ax = axes[2]
        speed = [float(a.get("seconds_per_round") or 0) for a in agents]
        accepted = [int(a.get("accepted") or 0) for a in agents]
        order = sorted(range(len(agents)), key=lambda i: speed[i])
        ax.bar(range(len(order)), [accepted[i] for i in order], color="tab:green")
        ax.set_xticks(range(len(order)), [agents[i]["agent"] for i in order], rotation=60, fontsize=7)
        ax.set_ylabel("accepted updates")
        ax.set_title("each agent's contribution (fastest first)")
    result = summary.get("result") or {}
    if result:
        fig.suptitle(f"{result.get('strategy', '')}: {result.get('agents', '')} agents, {result.get('seconds', '')} s, "
                     f"final accuracy {result.get('accuracy', '')}")
    fig.tight_layout()
    path = Path(out) if out is not None else run / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
