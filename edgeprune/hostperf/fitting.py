"""Fitting the latency model's constants to host measurements, and making a profile of them.

    decode:   1 / decode_tok_s  = bytes_read / bw_eff + n_layers * t_layer + t_token
    prefill:  ttft (P tokens)   = FLOPs / compute_eff + n_layers * P * t_layer_prefill + t_prefill

Non-negative least squares on relative residuals, so small and large models weigh the same.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import statistics
from dataclasses import dataclass, field, replace
from typing import Sequence

from edgeprune.errors import EdgepruneError
from edgeprune.geometry import ModelGeometry
from edgeprune.hostperf.host import isa_flags
from edgeprune.hostperf.timing import Measurement
from edgeprune.latency import BACKEND_FORMAT, LatencyConstants, byte_counts, decode_features, prefill_flops


def nnls(rows: Sequence[Sequence[float]], y: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Non-negative least squares for a handful of unknowns (tries every active set; no scipy)."""
    import numpy as np

    A = np.asarray(rows, dtype=float)
    b = np.asarray(y, dtype=float)
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        A, b = A * w[:, None], b * w
    n = A.shape[1]
    best, best_err = np.zeros(n), float(np.sum(b ** 2))
    scale = np.maximum(np.abs(A).max(axis=0), 1e-300)  # column scaling for conditioning
    As = A / scale
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            x_sub, *_ = np.linalg.lstsq(As[:, cols], b, rcond=None)
            if np.any(x_sub < 0):
                continue
            x = np.zeros(n)
            x[list(cols)] = x_sub
            err = float(np.sum((As @ x - b) ** 2))
            if err < best_err - 1e-15:
                best, best_err = x, err
    return [float(v) for v in best / scale]


@dataclass
class Fit:
    bandwidth_gbps: float
    layer_overhead_ms: float
    token_overhead_ms: float
    compute_gops: dict
    prefill_layer_token_overhead_ms: float
    prefill_overhead_ms: float
    dtype_bandwidth_gbps: dict = field(default_factory=dict)
    decode_rel_err: list = field(default_factory=list)
    prefill_rel_err: list = field(default_factory=list)


def fit_constants(measurements: Sequence[Measurement], backend: str, kv_dtype: str, prefill_logits: str) -> Fit:
    """Least-squares fit of the decode and prefill constants.

    decode:  1/decode_tok_s = bytes * (1/bw) + n_layers * t_layer + t_token            (3 unknowns)
    prefill: prefill_s      = sum_d [dtype = d] * FLOPs * (1/C_d) + n_layers * P * t_lt + t_p0
             (one compute rate per dtype, shared overheads)
    Non-negative, on relative residuals (each row divided by its measured value).
    """
    if len(measurements) < 3:
        raise EdgepruneError(f"fitting host constants needs at least 3 measured shapes, got {len(measurements)}")
    dtypes = list(dict.fromkeys(m.dtype for m in measurements))  # first = the profile's default
    rows, y = [], []
    for m in measurements:
        g = ModelGeometry.from_dict(m.geometry)
        bc = byte_counts(g, m.dtype, backend, kv_dtype)
        b, L = decode_features(g, bc, m.decode_pos)
        rows.append([b if m.dtype == d else 0.0 for d in dtypes] + [L, 1.0])
        y.append(1.0 / m.decode_tok_s)
    dcoef = nnls(rows, y, [1.0 / v for v in y])
    inv_bw, t_layer, t_token = dcoef[:-2], dcoef[-2], dcoef[-1]
    if any(ib <= 0 for ib in inv_bw):
        raise EdgepruneError("the fit could not separate the bandwidth term (decode time did not grow with "
                             "model bytes): the host is probably too busy; rerun with fewer other jobs")
    dec_err = [sum(r_i * c_i for r_i, c_i in zip(r, dcoef)) / v - 1.0 for r, v in zip(rows, y)]

    prow, py = [], []
    for m in measurements:
        g = ModelGeometry.from_dict(m.geometry)
        flops = prefill_flops(g, m.prompt_tokens, prefill_logits)
        prow.append([flops if m.dtype == d else 0.0 for d in dtypes] + [g.n_layers * m.prompt_tokens, 1.0])
        py.append(m.prefill_s)
    coef = nnls(prow, py, [1.0 / v for v in py])
    inv_c, t_lt, t_p0 = coef[:-2], coef[-2], coef[-1]
    for d, ic in zip(dtypes, inv_c):
        if ic <= 0:
            raise EdgepruneError(f"the fit could not find prefill compute for {d}: prefill time did not grow "
                                 "with FLOPs (host too busy?)")
    pre_err = [sum(r_i * c_i for r_i, c_i in zip(r, coef)) / v - 1.0 for r, v in zip(prow, py)]
    bws = {d: 1.0 / ib / 1e9 for d, ib in zip(dtypes, inv_bw)}
    return Fit(bandwidth_gbps=bws[dtypes[0]], layer_overhead_ms=t_layer * 1e3, token_overhead_ms=t_token * 1e3,
               dtype_bandwidth_gbps=bws if len(bws) > 1 else {},
               compute_gops={d: 1.0 / ic / 1e9 for d, ic in zip(dtypes, inv_c)},
               prefill_layer_token_overhead_ms=t_lt * 1e3, prefill_overhead_ms=t_p0 * 1e3,
               decode_rel_err=dec_err, prefill_rel_err=pre_err)


def _sig(x: float, n: int = 4) -> float:
    """x rounded to n significant digits (profiles stay readable without losing small overheads)."""
    return float(f"{x:.{n}g}")


def make_profile(fit: Fit, backend, dtypes, threads, host, version, kv_dtype, prefill_logits, base_profile, name,
                 n_shapes, prompt_tokens, gen_tokens, repeats):
    """A Profile with the fitted [latency] constants.

    base_profile: None (describe this host: its CPU, RAM and threads) or a profile whose hardware,
    memory, targets and export are kept (measuring *on* a device).
    """
    from edgeprune.profiles import (ExportSpec, Hardware, MemorySpec, Profile, Provenance, Targets,
                                    load_profile)

    today = _dt.date.today().isoformat()
    # Profile.provenance.calibrated is the profile schema's name for "when and where constants were measured"
    calibrated = f"calibrated on {host['hostname']} {today} with {backend} {version}"
    constants = LatencyConstants(
        backend=backend, bandwidth_gbps=_sig(fit.bandwidth_gbps),
        compute_gops={d: _sig(v) for d, v in fit.compute_gops.items()},
        layer_overhead_ms=_sig(fit.layer_overhead_ms), token_overhead_ms=_sig(fit.token_overhead_ms),
        prefill_layer_token_overhead_ms=_sig(fit.prefill_layer_token_overhead_ms),
        prefill_overhead_ms=_sig(fit.prefill_overhead_ms), kv_dtype=kv_dtype, prefill_logits=prefill_logits,
        dtype_bandwidth_gbps={d: _sig(v) for d, v in fit.dtype_bandwidth_gbps.items()})
    fmt = BACKEND_FORMAT[backend]
    mad = lambda xs: 100 * statistics.mean(abs(x) for x in xs) if xs else 0.0  # noqa: E731
    notes = (f"{n_shapes} synthetic random-weight shapes x {', '.join(dtypes)}, {threads} threads, prompt "
             f"{prompt_tokens}, {gen_tokens} generated tokens, lower quartile of {repeats} x rounds; in-sample mean |error| decode "
             f"{mad(fit.decode_rel_err):.1f}%, prefill {mad(fit.prefill_rel_err):.1f}%.")
    sources = [f"edgeprune.hostperf ({calibrated})"]
    if base_profile is not None:
        base = load_profile(base_profile)
        return replace(base, name=name, latency=constants, latency_version=version,
                       hardware=replace(base.hardware, threads=threads),
                       export=replace(base.export, format=fmt, dtypes=tuple(dtypes)),
                       provenance=Provenance(sources=tuple(sources) + base.provenance.sources,
                                             estimates=tuple(e for e in base.provenance.estimates
                                                             if not e.startswith("latency")),
                                             notes=notes, calibrated=calibrated),
                       source="")
    budget = int(min(host["ram"] * 0.5, host["ram"] - 2e9)) if host["ram"] > 4e9 else int(host["ram"] * 0.5)
    return Profile(
        name=name,
        hardware=Hardware(description=f"{host['cpu']} ({host['cores']} cores, {host['system']} {host['machine']})",
                          threads=threads, ram=host["ram"], accelerator="cpu", isa=isa_flags(),
                          notes=f"host {host['hostname']}"),
        latency=constants,
        memory=MemorySpec(budget=budget, context=2048, runtime_overhead=40_000_000),
        targets=Targets(prompt_tokens=512),
        export=ExportSpec(format=fmt, dtypes=tuple(dtypes), width_multiple=32),
        provenance=Provenance(sources=tuple(sources), estimates=("memory.budget", "memory.runtime_overhead"),
                              notes=notes, calibrated=calibrated),
        latency_version=version,
    )


def profile_header(profile, fit: Fit) -> str:
    """The comment block at the top of a written host profile."""
    return (f"edgeprune host profile '{profile.name}' written by `edgeprune measure-host`.\n"
            f"{profile.provenance.calibrated}.\n"
            f"Fitted: bandwidth {fit.bandwidth_gbps:.2f} GB/s, {fit.layer_overhead_ms:.3f} ms/layer + "
            f"{fit.token_overhead_ms:.3f} ms/token (decode); compute "
            + ", ".join(f"{k} {v:.1f} GOPS" for k, v in fit.compute_gops.items())
            + " (prefill).\nUnits: memory bytes or '300MB'; GB/s; GOPS; ms for overheads; seconds for ttft_max_s.\n"
            "Targets are empty: add [targets] decode_tok_s_min / ttft_max_s / memory_max for `edgeprune fit`.")
