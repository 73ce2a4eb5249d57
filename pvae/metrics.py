"""Per-epoch metrics of a run: ``metrics.jsonl`` (one JSON object a line), ``metrics.csv``, and
TensorBoard event files when the ``tensorboard`` package is installed."""

import csv
import io
import json
from pathlib import Path

from .utils import atomic_write

JSONL = "metrics.jsonl"
CSV = "metrics.csv"


class MetricsWriter:
    """Writes the whole history on every epoch, atomically: a resumed run rewrites what it restored."""

    def __init__(self, run_dir, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is optional
                pass
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, history: list) -> None:
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in history)
        atomic_write(self.run_dir / JSONL, lambda tmp: Path(tmp).write_text(lines))
        columns = list(dict.fromkeys(key for record in history for key in record))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
        atomic_write(self.run_dir / CSV, lambda tmp: Path(tmp).write_text(buffer.getvalue()))
        if self.tb is not None and history:
            record = history[-1]
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / JSONL
    if not path.is_file():
        raise FileNotFoundError(f"no {JSONL} in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
