"""Finding, reading and writing profiles: shipped names, paths, `extends`, and TOML out.

A profile may start from another one: `extends = "raspberrypi5"` (a shipped name) or
`extends = "../boards/base.toml"` (a path, relative to the extending file). The base is read
first, then the profile's own tables override it key by key: tables merge recursively, lists
and plain values replace. The base's `name` is never inherited (a profile is named by its own
`name` or its file name). `save_profile` always writes the resolved profile, without `extends`.
"""

from __future__ import annotations

import difflib
import math
import numbers
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from edgeprune.errors import EdgepruneError

from .schema import SCHEMA_VERSION, Profile, parse_profile, profile_to_dict

_PACKAGE = __package__  # "edgeprune.profiles": the TOML files ship beside this module


def _builtin_dir():
    return resources.files(_PACKAGE)


def list_profiles() -> list[str]:
    """Names of the profiles shipped with edgeprune, sorted."""
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def builtin_profile_text(name: str) -> str:
    """The shipped TOML of a profile, comments included (for `profiles show`)."""
    res = _builtin_dir().joinpath(f"{name}.toml")
    if not res.is_file():
        raise _unknown(name)
    return res.read_text(encoding="utf-8")


def _unknown(name: str, where: str = "") -> EdgepruneError:
    names = list_profiles()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    prefix = f"profile {where}: extends = '{name}': " if where else ""
    return EdgepruneError(f"{prefix}unknown profile '{name}'{hint}; available: {', '.join(names)}; "
                          "or pass the path of a .toml profile")


def _looks_like_path(s: str) -> bool:
    return s.endswith(".toml") or "/" in s or "\\" in s or s.startswith((".", "~"))


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgepruneError(f"cannot read profile {path}: {exc}") from None


def _parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgepruneError(f"profile {where}: not valid TOML: {exc}") from None


# --------------------------------------------------------------------------------------------
# extends


def merge_tables(base: dict, override: dict) -> dict:
    """`base` overridden by `override`, key by key: tables merge recursively, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = value
    return out


def _resolve_extends(data: dict, where: str, folder: Path | None, chain: tuple[str, ...]) -> dict:
    """`data` merged over its base (recursively). `folder` anchors relative paths (None: a shipped
    profile, whose relative paths mean other shipped files); `chain` holds the identities read
    so far, to catch cycles."""
    if "extends" not in data:
        return data
    ref = data["extends"]
    if not isinstance(ref, str) or not ref.strip():
        raise EdgepruneError(f"profile {where}: extends must be a shipped profile name or a path to a .toml, got {ref!r}")
    ref = ref.strip()
    if _looks_like_path(ref):
        if folder is None:  # a shipped profile extends another shipped file by its file name
            base_key, base_name = f"builtin:{Path(ref).stem}", Path(ref).stem
            if base_name not in list_profiles():
                raise _unknown(base_name, where)
            base_where, base_folder, text = f"{base_name} (built-in)", None, builtin_profile_text(base_name)
        else:
            path = (folder / Path(ref).expanduser()).resolve()
            if not path.is_file():
                raise EdgepruneError(f"profile {where}: extends = '{ref}': file not found ({path})")
            base_key, base_name = str(path), path.stem
            base_where, base_folder, text = str(path), path.parent, _read_file(path)
    else:
        if ref not in list_profiles():
            raise _unknown(ref, where)
        base_key, base_name = f"builtin:{ref}", ref
        base_where, base_folder, text = f"{ref} (built-in)", None, builtin_profile_text(ref)
    if base_key in chain:
        names = [k.removeprefix("builtin:") for k in chain + (base_key,)]
        raise EdgepruneError(f"profile {where}: extends makes a cycle ({' -> '.join(names)}); "
                             "remove extends from one of them")
    base = _resolve_extends(_parse_toml(text, base_where), base_where, base_folder, chain + (base_key,))
    base = {k: v for k, v in base.items() if k != "name"}
    own = {k: v for k, v in data.items() if k != "extends"}
    return merge_tables(base, own)


# --------------------------------------------------------------------------------------------
# Loading


def loads_profile(text: str, where: str = "<string>", default_name: str = "", folder: str | Path | None = ".",
                  _identity: str = "") -> Profile:
    """A profile from TOML text. `folder` anchors a relative `extends` path (default: the current
    directory; None: the shipped profiles)."""
    data = _parse_toml(text, where)
    anchor = None if folder is None else Path(folder)
    data = _resolve_extends(data, where, anchor, (_identity or where,))
    return parse_profile(data, where, default_name)


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (`raspberrypi5`) or any profile by path (`./my-board.toml`)."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    s = str(name_or_path)
    path = Path(s).expanduser()
    if isinstance(name_or_path, Path) or _looks_like_path(s) or path.is_file():
        if not path.is_file():
            raise EdgepruneError(f"profile file not found: {path} (built-in profiles: {', '.join(list_profiles())})")
        return loads_profile(_read_file(path), str(path), default_name=path.stem, folder=path.resolve().parent,
                             _identity=str(path.resolve()))
    if s not in list_profiles():
        raise _unknown(s)
    return loads_profile(builtin_profile_text(s), f"{s} (built-in)", default_name=s, folder=None,
                         _identity=f"builtin:{s}")


# --------------------------------------------------------------------------------------------
# Writing


def _plain(value: Any) -> Any:
    """`value` with numpy-style numbers as Python int/float (tomli-w takes only those)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            raise EdgepruneError(f"cannot write a non-finite number ({v}) to a profile")
        return v
    raise EdgepruneError(f"cannot write {type(value).__name__} to a profile")


def dumps_toml(data: dict, header: str = "") -> str:
    """TOML text for a dict of scalars, lists and (nested) tables, after `header` as # comments."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    head = "\n".join(lines) + "\n\n" if lines else ""
    return head + tomli_w.dumps(_plain(data))


def profile_to_toml(profile: Profile, header: str | None = None) -> str:
    if header is None:
        header = (f"edgeprune device profile '{profile.name}' (schema {SCHEMA_VERSION}).\n"
                  "Units: bytes for memory (or '300MB'), GB/s, GOPS, ms for overheads, seconds for ttft_max_s.")
        if profile.provenance.calibrated:
            header += f"\n{profile.provenance.calibrated}"
    data = profile_to_dict(profile, human_units=True)
    return dumps_toml({k: v for k, v in data.items() if not isinstance(v, dict) or v}, header)


def save_profile(profile: Profile, path: str | Path, header: str | None = None) -> Path:
    """Write `profile` (resolved: no extends) as TOML that `load_profile` reads back to an equal profile."""
    path = Path(path)
    text = profile_to_toml(profile, header)
    loads_profile(text, str(path), default_name=profile.name)  # never write what we cannot read
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


write_profile = save_profile  # the name hostcal, fit's tests and benchmarks call


def describe_profile(profile: Profile) -> str:
    """A few human lines for `profiles show` / `profiles list -v`."""
    p, c, t = profile, profile.latency, profile.targets
    est = lambda k: " (estimate)" if p.is_estimate(k) else ""  # noqa: E731
    lines = [
        f"{p.name}: {p.hardware.description}",
        f"  backend {c.backend}, {p.hardware.threads} threads, export {p.export.format} "
        f"{'/'.join(p.export.dtypes)} (default {p.export.default_dtype}), widths multiple of {p.export.width_multiple}",
        f"  bandwidth {c.bandwidth_gbps:g} GB/s{est('latency.bandwidth_gbps')}; compute "
        + ", ".join(f"{k} {v:g} GOPS{est('latency.compute_gops.' + k)}" for k, v in c.compute_gops.items()),
        f"  overheads: {c.layer_overhead_ms:g} ms/layer + {c.token_overhead_ms:g} ms/token (decode), "
        f"{c.prefill_layer_token_overhead_ms:g} ms/layer/prompt token + {c.prefill_overhead_ms:g} ms (prefill)",
        f"  memory budget {p.memory.budget / 1e9:g} GB at {p.memory.context}-token context "
        f"(runtime overhead {p.memory.runtime_overhead / 1e6:g} MB)",
    ]
    tparts = []
    if t.decode_tok_s_min:
        tparts.append(f"decode >= {t.decode_tok_s_min:g} tok/s")
    if t.ttft_max_s:
        tparts.append(f"TTFT <= {t.ttft_max_s:g} s for a {t.prompt_tokens}-token prompt")
    tparts.append(f"memory <= {p.memory_limit / 1e6:g} MB")
    lines.append("  targets: " + ", ".join(tparts))
    if p.provenance.calibrated:
        lines.append(f"  {p.provenance.calibrated}")
    return "\n".join(lines)
