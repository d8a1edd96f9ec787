"""Metrics of a run: one JSON line per logged step in RUN_DIR/metrics.jsonl, TensorBoard events when the
`tensorboard` package is installed. Only rank 0 writes. On resume, lines after the resumed step are dropped, so
the file reads as one uninterrupted run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from funaudiochat import fileio

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    # a line cut by a kill is not a JSON object: skipped
    return [row for _, row in fileio.read_jsonl(path) if not isinstance(row, fileio.LineProblem)]


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step] if resume_step else []
        fileio.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with fileio.storage_errors(self.path):
            self.file.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
