"""Give back the pages of memory-mapped weights that pruning has replaced.

transformers maps a safetensors file privately (copy-on-write) and its tensors are views into the
mapping: once a pass has touched them, their pages count in RSS until the whole file is unmapped,
which never happens while one of its tensors lives (the embedding always does). Pruning a model in
place puts new, smaller tensors beside the old ones, so a 1B model pruned at 30% held its mapped
dense weights plus the pruned copy: 8.7 GB for a 4.9 GB model (issue #15).

`releasing(changed, live)`, around code that replaces tensors, tells the kernel the pages of the
old tensors nobody uses any more are not needed (madvise MADV_DONTNEED: a private mapping's changes
to them would be lost, so only for tensors no one uses); `page_out(tensors)` asks it to reclaim the
pages of tensors still in use (MADV_PAGEOUT: clean pages are dropped and read back from the file on
the next touch, changed ones are kept), so that a block-by-block pass holds about one block of
mapped weights. Only tensors that lie wholly inside a file-backed mapping are touched (anonymous
memory would be zeroed instead), only whole pages inside each tensor (a neighbour's bytes may share
the edge pages), and only on Linux; elsewhere it is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys

import torch

MADV_DONTNEED = 4  # Linux: drop the pages (a private mapping's own changes are lost: only for tensors no one uses)
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim them (clean ones dropped, changed ones kept): safe for tensors still in use
_PAGE = mmap.PAGESIZE


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of regular files (from /proc/self/maps)."""
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/") and parts[4] != "0":  # inode 0: anonymous
                start, end = (int(x, 16) for x in parts[0].split("-"))
                spans.append((start, end))
    return spans


def _byte_span(t: torch.Tensor) -> tuple[int, int] | None:
    if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return None
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def tensor_spans(tensors) -> set[tuple[int, int]]:
    return {s for s in map(_byte_span, tensors) if s is not None}


def _advise(spans, advice: int) -> int:
    if not sys.platform.startswith("linux") or not spans:
        return 0
    maps = _file_mappings()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for start, end in spans:
        if not any(a <= start and end <= b for a, b in maps):
            continue
        lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
        if hi > lo and libc.madvise(lo, hi - lo, advice) == 0:
            done += hi - lo
    return done


def release(spans) -> int:
    """Drop the file-backed pages inside `spans` ((start, end) byte ranges of tensors no longer in use);
    returns the bytes given back."""
    return _advise(spans, MADV_DONTNEED)


def page_out(tensors) -> int:
    """Ask the kernel to reclaim the file-backed pages of `tensors`, which stay in use: the next read
    faults them back in from the file, so a pass over the model block by block keeps about one block
    resident. Pages a private mapping has changed are kept (there is no swap to put them in), so
    nothing is ever lost. Returns the bytes advised (0 where the kernel has no MADV_PAGEOUT)."""
    return _advise(tensor_spans(tensors), MADV_PAGEOUT)


def _storage_span(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()  # the whole storage, not the view: conservative for slices and transposes
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def module_tensors(modules) -> list[torch.Tensor]:
    """Every parameter and buffer of `modules`."""
    return [t for m in modules for t in m.state_dict(keep_vars=True).values()]


@contextlib.contextmanager
def releasing(changed, live):
    """Around code that replaces tensors of the modules `changed`: afterwards, release the mapped pages
    of their old tensors that no tensor of the modules `live` still overlaps."""
    before = tensor_spans(module_tensors(changed))
    yield
    spans = [_storage_span(t) for t in module_tensors(live) if t.device.type == "cpu"]
    release({(a, b) for a, b in before if not any(a < y and x < b for x, y in spans)})
