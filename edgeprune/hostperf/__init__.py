"""Host measurement: fit the latency model's constants by timing synthetic models on this machine.

Latency does not depend on weight values, so synthetic random-weight Llama models of several
shapes (`shapes`) are exported with edgeprune's own exporters, timed round-robin in llama.cpp or
onnxruntime (`timing`), and the constants of `edgeprune.latency` are fitted by non-negative least
squares (`fitting`). Held-out shapes measured in the same session but never fitted tell how well
the fitted profile predicts (`validate`).

Entry points: `measure_host` (the `edgeprune measure-host` verb: writes a profile) and
`run_host_measurement` (everything, written nowhere; benchmarks/latency_model.py uses it).

Progress goes to two callbacks with one type each: `progress(label, done, total)` (the CLI's
progress bars, one bar per label) and `log(message)` (text lines).

Not to be confused with `edgeprune.calibrate`, which collects activation statistics for pruning.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from edgeprune.errors import EdgepruneError
from edgeprune.geometry import ModelGeometry
from edgeprune.hostperf.fitting import Fit, fit_constants, make_profile, nnls, profile_header
from edgeprune.hostperf.host import backend_available, busy_warning, host_description, runtime_version
from edgeprune.hostperf.shapes import build_model, fitting_shapes, heldout_shapes, synthetic_shape
from edgeprune.hostperf.timing import LogFn, Measurement, ProgressFn, Reporter, check_timing, measure_shape, measure_shapes
from edgeprune.hostperf.validate import ValidationReport, ValidationRow, compare
from edgeprune.latency import BACKEND_FORMAT, BACKENDS, normalize_dtype

__all__ = ["DEFAULT_DTYPE", "Fit", "HostMeasurement", "Measurement", "ValidationReport", "ValidationRow",
           "backend_available", "build_model", "compare", "fit_constants", "fitting_shapes", "heldout_shapes",
           "host_description", "measure_host", "measure_shape", "measure_shapes", "nnls", "run_host_measurement",
           "synthetic_shape"]

DEFAULT_DTYPE = {"llama.cpp": "q8_0", "onnxruntime": "int8"}


@dataclass
class HostMeasurement:
    """One host measurement session: the fitted profile and everything it was fitted from."""

    profile: object  # edgeprune.profiles.Profile
    fit: Fit
    measurements: list
    backend: str
    dtypes: tuple
    threads: int
    seconds: float
    host: dict
    heldout: list = field(default_factory=list)  # measurements of held-out shapes (not fitted)
    validation: ValidationReport | None = None  # the fitted profile on `heldout`, or None

    def to_dict(self) -> dict:
        from edgeprune.profiles import profile_to_dict

        return {"backend": self.backend, "dtypes": list(self.dtypes), "threads": self.threads,
                "seconds": self.seconds, "host": self.host, "fit": asdict(self.fit),
                "measurements": [asdict(m) for m in self.measurements],
                "heldout_measurements": [asdict(m) for m in self.heldout],
                "validation": self.validation.to_dict() if self.validation else None,
                "profile": profile_to_dict(self.profile)}


def _dtypes_arg(backend: str, dtype) -> tuple[str, ...]:
    from edgeprune.profiles import FORMAT_DTYPES

    if dtype is None:
        dts = (DEFAULT_DTYPE[backend],)
    elif isinstance(dtype, str):
        dts = tuple(d.strip() for d in dtype.split(",") if d.strip())
    else:
        dts = tuple(dtype)
    dts = tuple(normalize_dtype(d) for d in dts)
    allowed = FORMAT_DTYPES[BACKEND_FORMAT[backend]]
    for d in dts:
        if d not in allowed:
            raise EdgepruneError(f"dtype {d} cannot be benchmarked with {backend}; use one of {', '.join(allowed)}")
    return dts


def run_host_measurement(backend: str = "llama.cpp", dtype=None, threads: int | None = None, quick: bool = False,
                         progress: ProgressFn | None = None, log: LogFn | None = None,
                         shapes: Sequence[ModelGeometry] | None = None, prompt_tokens: int = 128,
                         gen_tokens: int | None = None, repeats: int | None = None, workdir: Path | None = None,
                         base_profile=None, name: str = "host", timing: str = "wall", rounds: int = 2,
                         heldout: Sequence[ModelGeometry] | None = None) -> HostMeasurement:
    """Time synthetic shapes with `backend` and fit a profile; see `measure_host` for the arguments.

    shapes: the fitting shapes (default `fitting_shapes(quick)`). heldout: shapes measured in the
    same round-robin session (so machine-load drift hits both sets alike) but never fitted; the
    result's `validation` compares them with the fitted profile.
    """
    if backend not in BACKENDS:
        raise EdgepruneError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    ok, why = backend_available(backend)
    if not ok:
        raise EdgepruneError(why)
    dtypes = _dtypes_arg(backend, dtype)
    host = host_description()
    threads = threads or host["physical_cores"]
    check_timing(timing, threads)
    gen_tokens = gen_tokens or (32 if quick else 64)
    repeats = repeats or (3 if quick else 5)
    shapes = list(shapes) if shapes is not None else fitting_shapes(quick)
    say = Reporter(progress, log)
    busy = busy_warning(threads, timing, host["cores"])
    if busy:
        say.note(busy)
    kv_dtype = "f16" if backend == "llama.cpp" else "f32"
    prefill_logits = "last" if backend == "llama.cpp" else "all"
    start = time.perf_counter()
    heldout = list(heldout or [])
    fit_names = {s.name for s in shapes}
    if fit_names & {s.name for s in heldout}:
        raise EdgepruneError(f"held-out shapes overlap the fitting shapes: {sorted(fit_names & {s.name for s in heldout})}")
    with tempfile.TemporaryDirectory(prefix="edgeprune-hostperf-", dir=workdir) as tmp:
        measured = measure_shapes(shapes + heldout, backend, dtypes, Path(tmp), threads, prompt_tokens, gen_tokens,
                                  repeats, say, timing, rounds)
    measurements = [m for m in measured if m.shape in fit_names]
    held = [m for m in measured if m.shape not in fit_names]
    fit = fit_constants(measurements, backend, kv_dtype, prefill_logits)
    version = runtime_version(backend)
    profile = make_profile(fit, backend, dtypes, threads, host, version, kv_dtype, prefill_logits, base_profile,
                           name, len(shapes), prompt_tokens, gen_tokens, repeats)
    validation = ValidationReport(backend, profile.name, [compare(m, profile) for m in held]) if held else None
    return HostMeasurement(profile, fit, measurements, backend, dtypes, threads, time.perf_counter() - start, host,
                           held, validation)


def measure_host(backend: str = "llama.cpp", dtype=None, threads: int | None = None, out: Path | str | None = "host.toml",
                 quick: bool = False, progress: ProgressFn | None = None, log: LogFn | None = None, base_profile=None,
                 name: str = "host", record: Path | str | None = None, **kwargs):
    """Time synthetic models on this machine and write a profile with the fitted latency constants.

    backend: "llama.cpp" (GGUF) or "onnxruntime" (ONNX). dtype: one dtype or several ("q8_0,q4_0");
    default q8_0 / int8. threads: default the physical cores. out: the TOML to write (None: don't).
    quick: 6 shapes, 32 generated tokens, 3 repeats per round (a few minutes on 2 cores) instead of 8/64/5.
    progress: `progress(label, done, total)`; log: `log(message)` (see the module docstring).
    timing: "wall" (default) or "cpu" (needs threads=1; use it on a busy/shared machine).
    rounds: round-robin timing passes (default 2). heldout: extra shapes measured in the same
    session and reported in the result's `validation` (via run_host_measurement; measure_host only
    returns the profile, record= keeps everything).
    base_profile: keep that profile's hardware/memory/targets/export and replace its [latency]
    (measuring *on* a device). record: also write the measurements and fit as JSON there.
    Returns the Profile (also written to `out`).
    """
    result = run_host_measurement(backend, dtype, threads, quick, progress, log, base_profile=base_profile, name=name,
                                  **kwargs)
    if out:
        from edgeprune.profiles import write_profile

        write_profile(result.profile, out, header=profile_header(result.profile, result.fit))
    if record:
        Path(record).write_text(json.dumps(result.to_dict(), indent=2))
    return result.profile
