"""A run on disk, for `fedmqtt report` and any spreadsheet: ``metrics.csv`` (one row per metrics reading),
``agents.csv`` (one row per agent, from the demo) and ``run.json`` (the summary and the last metrics).

>>> import tempfile
>>> from fedmqtt.schemas import Metrics
>>> rec = Recorder(Path(tempfile.mkdtemp()))
>>> rec.metrics(1.0, Metrics(version=3, accepted=3, rejected=0, rejected_by_reason={}, accuracy=0.5))
>>> (rec.directory / "metrics.csv").read_text().splitlines()[1]
'1.0,3,3,0,0.5,,,0,0.0'
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fedmqtt.schemas import Metrics

METRICS_COLUMNS = ("seconds", "version", "accepted", "rejected", "accuracy", "loss", "staleness_mean",
                   "agents_online", "updates_per_s")


class Recorder:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._metrics = self.directory / "metrics.csv"
        with self._metrics.open("w", newline="") as f:
            csv.writer(f).writerow(METRICS_COLUMNS)
        self.last: Metrics | None = None

    def metrics(self, seconds: float, m: Metrics) -> None:
        row = [round(seconds, 2), m.version, m.accepted, m.rejected, m.accuracy, m.loss, m.staleness_mean,
               m.agents_online, round(m.updates_per_s, 2)]
        with self._metrics.open("a", newline="") as f:
            csv.writer(f).writerow(["" if v is None else v for v in row])
        self.last = m
        self._summary({})

    def finish(self, result: Any) -> None:
        """The demo's result: the per-agent table and the summary."""
        summary = result.as_dict()
        per_agent = summary.pop("per_agent", [])
        if per_agent:
            columns = list(dict.fromkeys(k for row in per_agent for k in row))
            with (self.directory / "agents.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(per_agent)
        self._summary(summary)

    def _summary(self, summary: dict[str, Any]) -> None:
        last = self.last.model_dump(by_alias=True) if self.last is not None else None
        (self.directory / "run.json").write_text(json.dumps({"result": summary, "last_metrics": last}, indent=1))
