"""Held-out comparison: what a fitted profile predicts for measured shapes it was not fitted on.

Errors are in % of the measurement; positive = the model predicts faster decode / longer prefill
than measured.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from edgeprune.geometry import ModelGeometry
from edgeprune.hostperf.timing import Measurement
from edgeprune.latency import predict


@dataclass
class ValidationRow:
    shape: str
    dtype: str
    n_layers: int
    params: int
    predicted_decode_tok_s: float
    measured_decode_tok_s: float
    decode_error_pct: float
    predicted_prefill_s: float
    measured_prefill_s: float
    prefill_error_pct: float
    file_bytes: int
    predicted_weight_bytes: int


@dataclass
class ValidationReport:
    backend: str
    profile: str
    rows: list

    @property
    def decode_within_10(self) -> int:
        return sum(abs(r.decode_error_pct) <= 10 for r in self.rows)

    @property
    def prefill_within_10(self) -> int:
        return sum(abs(r.prefill_error_pct) <= 10 for r in self.rows)

    def summary(self) -> dict:
        n = len(self.rows)
        mae = lambda xs: statistics.mean(abs(x) for x in xs) if xs else 0.0  # noqa: E731
        return {"shapes": n, "decode_within_10pct": self.decode_within_10, "prefill_within_10pct": self.prefill_within_10,
                "decode_mean_abs_error_pct": mae([r.decode_error_pct for r in self.rows]),
                "prefill_mean_abs_error_pct": mae([r.prefill_error_pct for r in self.rows]),
                "decode_max_abs_error_pct": max((abs(r.decode_error_pct) for r in self.rows), default=0.0),
                "prefill_max_abs_error_pct": max((abs(r.prefill_error_pct) for r in self.rows), default=0.0)}

    def table(self) -> str:
        head = (f"{'shape':32s} {'dtype':6s} {'L':>3s} {'params':>8s} | {'decode tok/s pred':>17s} {'meas':>7s} {'err%':>6s} "
                f"| {'prefill s pred':>14s} {'meas':>7s} {'err%':>6s}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.shape:32s} {r.dtype:6s} {r.n_layers:3d} {r.params / 1e6:7.1f}M | {r.predicted_decode_tok_s:17.1f} "
                         f"{r.measured_decode_tok_s:7.1f} {r.decode_error_pct:+6.1f} | {r.predicted_prefill_s:14.3f} "
                         f"{r.measured_prefill_s:7.3f} {r.prefill_error_pct:+6.1f}")
        s = self.summary()
        lines.append(f"within +-10%: decode {s['decode_within_10pct']}/{s['shapes']}, prefill {s['prefill_within_10pct']}/{s['shapes']}; "
                     f"mean |error| decode {s['decode_mean_abs_error_pct']:.1f}%, prefill {s['prefill_mean_abs_error_pct']:.1f}%")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "profile": self.profile, "summary": self.summary(),
                "rows": [asdict(r) for r in self.rows]}


def compare(measurement: Measurement, profile) -> ValidationRow:
    """Predicted vs measured for one benchmarked shape under `profile`'s constants."""
    g = ModelGeometry.from_dict(measurement.geometry)
    pred = predict(g, measurement.dtype, profile.latency, prompt_tokens=measurement.prompt_tokens,
                   context=measurement.prompt_tokens + measurement.gen_tokens, decode_pos=int(measurement.decode_pos))
    return ValidationRow(
        shape=measurement.shape, dtype=measurement.dtype, n_layers=g.n_layers, params=g.param_counts()["total"],
        predicted_decode_tok_s=pred.decode_tok_s, measured_decode_tok_s=measurement.decode_tok_s,
        decode_error_pct=100 * (pred.decode_tok_s / measurement.decode_tok_s - 1),
        predicted_prefill_s=pred.prefill_s, measured_prefill_s=measurement.prefill_s,
        prefill_error_pct=100 * (pred.prefill_s / measurement.prefill_s - 1),
        file_bytes=measurement.file_bytes, predicted_weight_bytes=int(pred.memory.weights))
