"""One estimate: a mean over datapoints and its standard error."""

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Estimate:
    """A mean over datapoints and its standard error, NaN for a single datapoint (no spread to
    estimate it from); written to JSON as ``null``."""

    mean: float
    se: float

    @classmethod
    def of(cls, values) -> "Estimate":
        if torch.is_tensor(values):
            values = values.detach().double().cpu().numpy()
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            raise ValueError("an estimate needs at least one value")
        se = values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else math.nan
        return cls(float(values.mean()), float(se))

    @classmethod
    def from_dict(cls, d: dict) -> "Estimate":
        return cls(d["mean"], math.nan if d.get("se") is None else d["se"])

    def __str__(self) -> str:
        return f"{self.mean:.2f}" if not math.isfinite(self.se) else f"{self.mean:.2f} ± {self.se:.2f}"
