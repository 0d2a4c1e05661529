"""Output safety: never destroy what the user had, never leave temporary files behind.

* `check_out` runs before any expensive work: an existing, non-empty `--out` is refused unless
  `--force`, and `--force` replaces only edgeprune's own earlier output (`is_edgeprune_output`:
  a directory holding the `.edgeprune` marker or an edgeprune sidecar, a GGUF whose metadata
  says edgeprune wrote it). The current directory, its ancestors and the home directory are
  never an output.
* Temporary outputs are named `.NAME.<pid>.<random>.partial` beside their destination and are
  registered here while they live: the SIGTERM/SIGINT handlers turn the signal into `Interrupted`
  (so every `finally` runs) and `cleanup()` removes whatever is still registered; a run killed
  with SIGKILL leaves names whose pid is dead, which the next run writing there removes
  (`sweep_stale`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

from edgeprune.errors import EdgepruneError

MARKER = ".edgeprune"
# Files that only edgeprune writes: a checkpoint's plan, an ONNX export's sidecar.
_SIDECARS = ("edgeprune_onnx.json",)
_live: set[Path] = set()
_created_dirs: list[Path] = []


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException (like KeyboardInterrupt) so that library code's
    `except Exception` cannot swallow it, but not a KeyboardInterrupt, which click would turn into
    a silent abort."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []


def _on_signal(signum, frame):
    # A second signal during cleanup must not cut the cleanup short.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted(signum)


def interrupted_by() -> "Interrupted | None":
    """The signal that arrived, if one did. Raised inside a C extension's initialisation (a module
    being imported), `Interrupted` reaches the caller as an ImportError: the signal is the cause."""
    return Interrupted(_received[0]) if _received else None


def install_signal_handlers() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _on_signal)


# ------------------------------------------------------------------------------ temporary paths
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def register(path: Path) -> Path:
    _live.add(Path(path))
    return Path(path)


def unregister(path: Path) -> None:
    _live.discard(Path(path))


def cleanup(failed: bool = True) -> None:
    """Remove every registered temporary path; after a failure also the output directories this
    run created and left holding nothing but the marker."""
    for path in list(_live):
        _remove(path)
        _live.discard(path)
    if failed:
        for d in reversed(_created_dirs):
            try:
                if d.is_dir() and {p.name for p in d.iterdir()} <= {MARKER}:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass
    _created_dirs.clear()


def _stale_pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(f".{name}.") + r"(\d+)\.[^/]*\.partial")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(final: Path) -> None:
    """Remove temporaries of `final` left by runs that no longer exist (SIGKILL, power loss)."""
    final = Path(final)
    pattern = _stale_pattern(final.name)
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(entry)


def temp_file(final: Path) -> Path:
    final = Path(final)
    sweep_stale(final)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}.", suffix=".partial")
    os.close(fd)
    return register(Path(tmp))


def temp_dir(final: Path) -> Path:
    final = Path(final)
    sweep_stale(final)
    return register(Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}.", suffix=".partial")))


def write_marker(directory: Path, kind: str) -> None:
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": "edgeprune", "kind": kind}) + "\n")


def claim_dir(directory: Path, kind: str) -> None:
    """Create (or keep) an output directory and mark it as edgeprune's; a directory this run
    created is removed again if the run fails before writing anything else into it."""
    directory = Path(directory)
    if not directory.exists():
        directory.mkdir(parents=True)
        _created_dirs.append(directory)
    if not (directory / MARKER).exists():
        write_marker(directory, kind)


# ------------------------------------------------------------------------------ whose output
def _gguf_written_by_edgeprune(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        if any(k.startswith("edgeprune.") for k in reader.fields):
            return True
        field = reader.fields.get("general.name")
        return field is not None and str(field.contents()).endswith("(edgeprune)")
    except Exception:  # unreadable or corrupt: not provably ours
        return False


def is_edgeprune_output(path: Path) -> bool:
    path = Path(path)
    if path.is_dir():
        return (path / MARKER).is_file() or any((path / s).is_file() for s in _SIDECARS) or _is_checkpoint(path)
    if path.is_file():
        return path.suffix == ".gguf" and _gguf_written_by_edgeprune(path)
    return False


def _is_checkpoint(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (path / "plan.json").is_file() and isinstance(cfg, dict) and "edgeprune_layer_shapes" in cfg


# ------------------------------------------------------------------------------ --out checks
def _protected(resolved: Path) -> str | None:
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "the current directory or one of its parents"
    if resolved == home:
        return "your home directory"
    if resolved == Path(resolved.anchor):
        return "a filesystem root"
    return None


def check_out(out: Path, force: bool = False, kind: str = "dir", inputs: tuple = (), flag: str = "--out") -> None:
    """Refuse an output path that would destroy something, or that cannot be written (exit 2)."""
    out = Path(out).expanduser()
    if str(out).strip() == "":
        raise EdgepruneError(f"{flag} is empty: name a {'directory' if kind == 'dir' else 'file'}")
    resolved = out.resolve()
    why = _protected(resolved)
    if why:
        raise EdgepruneError(f"{flag} {out} is {why}: name a new {'directory' if kind == 'dir' else 'file'} for the output")
    for src in inputs:
        if src is None:
            continue
        src_path = Path(str(src)).expanduser()
        if not src_path.exists():
            continue
        s = src_path.resolve()
        if resolved == s or s in resolved.parents or resolved in s.parents:
            raise EdgepruneError(f"{flag} {out} overlaps the input {src}: write the output somewhere else")
    if out.is_symlink() or out.exists():
        if kind == "dir" and not out.is_dir():
            raise EdgepruneError(f"{flag} {out} is an existing file, not a directory: name a directory")
        if kind == "file" and out.is_dir():
            raise EdgepruneError(f"{flag} {out} is a directory: name the output file, e.g. {out}/model.gguf")
        empty = out.is_dir() and not any(out.iterdir())
        if not empty:
            if not force:
                raise EdgepruneError(f"{flag} {out} already exists: pass --force to replace an earlier edgeprune output, or choose a new path")
            if not is_edgeprune_output(out):
                raise EdgepruneError(f"{flag} {out} was not written by edgeprune: --force replaces only edgeprune's own outputs; choose a new path")
    _check_writable(out, flag)


def _check_writable(out: Path, flag: str) -> None:
    """The nearest existing ancestor must be a directory this user can create entries in."""
    probe = out.parent  # temporaries are created beside the output, then renamed into place
    while not probe.exists():
        if probe.is_symlink():  # a dangling link on the way
            raise EdgepruneError(f"{flag} {out}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise EdgepruneError(f"{flag} {out}: {probe} is a file, so nothing can be created under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EdgepruneError(f"{flag} {out}: {probe} is not writable")
