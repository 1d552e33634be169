"""What the user chose about calibration (fp8norm.calibrate computes it): apart from the computation,
so that planning imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

CALIB_MODES = ("max", "rms", "percentile", "mse")


@dataclass(frozen=True)
class CalibSettings:
    mode: str = "max"
    rms_factor: float = 3.0
    percentile: float = 99.9
    mse_grid: int = 50

    def __post_init__(self):
        if self.mode not in CALIB_MODES:
            raise ValueError(f"calibration mode must be one of {CALIB_MODES}, got {self.mode!r}")
        if not (math.isfinite(self.rms_factor) and self.rms_factor > 0):
            raise ValueError(f"--rms-factor must be finite and > 0, got {self.rms_factor}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"--percentile must be in (0, 100], got {self.percentile}")
        if self.mse_grid < 1:
            raise ValueError(f"--mse-grid must be >= 1, got {self.mse_grid}")

    def describe(self) -> str:
        return {"max": "max", "rms": f"rms(k={self.rms_factor:g})", "percentile": f"percentile(p={self.percentile:g})",
                "mse": f"mse(grid={self.mse_grid})"}[self.mode]

    def to_dict(self) -> dict:
        d = {"mode": self.mode}
        d.update({"rms": {"rms_factor": self.rms_factor}, "percentile": {"percentile": self.percentile},
                  "mse": {"mse_grid": self.mse_grid}}.get(self.mode, {}))
        return d
