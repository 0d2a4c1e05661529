"""Importance matrix: how strongly each input column of each weight is driven, for llama.cpp's quantizer.

For a linear weight W [out, in] applied to activations x, the rounding error of column j adds
err_j * x_j to every output, so the columns that matter are those with large E[x_j^2]. llama.cpp's
quantizer takes, per GGUF weight, that mean squared input activation (one float per column) and
weighs each column's rounding error by it when it picks block scales.

`collect_imatrix` measures it in torch with forward hooks, keyed by the GGUF tensor names the
writer uses. As in llama.cpp's `imatrix` tool: q/k/v see the attention-normed hidden states,
attn_output the attention heads' output, gate/up the FFN-normed hidden states, ffn_down the gated
FFN activations, and the output projection the final-normed hidden states. A tied model has no
output.weight: its output projection *is* token_embd.weight, and the quantizer looks an imatrix up
by the name of the tensor it is quantizing, so that entry is named token_embd.weight.

The file format is llama.cpp's current one (tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp):
a GGUF with general.type = "imatrix", imatrix.datasets / imatrix.chunk_count / imatrix.chunk_size,
and per weight two F32 tensors: `<name>.in_sum2` (sums of squares, [1, row]) and `<name>.counts`
(tokens seen, [1, 1]); `llama-quantize --imatrix FILE` divides one by the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from edgeprune.errors import EdgepruneError
from edgeprune.exporters.gguf import write_and_close
from edgeprune.families import LINEAR_ROLES, family_of

_IN_SUM2, _COUNTS = ".in_sum2", ".counts"

def block_linears(model, i: int, layer):
    """(GGUF name, nn.Linear) of block i's weights that llama.cpp quantizes with an imatrix."""
    fam = family_of(model)
    for role in LINEAR_ROLES:
        lin = fam.linear(layer, role)
        if lin.in_features and lin.out_features:  # a head-less pruned layer has no attention tensors
            yield f"blk.{i}.{role}.weight", lin


def head_name(model) -> str | None:
    """The GGUF name under which the output projection's entry goes (a tied one is token_embd)."""
    head = model.get_output_embeddings()
    if head is None:
        return None
    return "token_embd.weight" if head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr() else "output.weight"


class SquareSums:
    """Running sums of x_j^2 (float64) per input column, per GGUF weight, from forward pre-hooks."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sums[name] = self.sums.get(name, 0) + (x * x).sum(0).cpu()
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def hook(self, name: str):
        return lambda module, args: self.add(name, args[0])

    def means(self) -> dict[str, np.ndarray]:
        return {name: (s / self.counts[name]).float().numpy() for name, s in self.sums.items()}


def collect_imatrix(model, ids, batch_size: int = 4, progress=None) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 [in_features] mean of x_j^2 over every token of `ids`}.

    ids: [n, T] token ids (torch or numpy), each row one window run from an empty context. Every
    weight sees every token, so the count behind each mean is ids.size (`write_imatrix_gguf` takes it).
    The output projection's input is the base model's final hidden state, so the logits (a quarter
    of a 1B model's work at a 128k vocabulary) are never computed.
    progress: optional callable taking one status string per batch.
    """
    import torch

    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if ids.ndim != 2 or ids.numel() == 0:
        raise EdgepruneError("collect_imatrix needs [n, T] token ids with at least one token")
    device = next(model.parameters()).device
    sums = SquareSums()
    hooks = [lin.register_forward_pre_hook(sums.hook(name))
             for i, layer in enumerate(family_of(model).layers(model)) for name, lin in block_linears(model, i, layer)]
    head = head_name(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(ids), batch_size):
                if progress:
                    progress(f"imatrix: batch {b // batch_size + 1}/{-(-len(ids) // batch_size)}")
                hidden = model.model(ids[b:b + batch_size].to(device), use_cache=False).last_hidden_state
                if head is not None:
                    sums.add(head, hidden)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sums.means()


@dataclass
class ImatrixFile:
    """What an imatrix GGUF holds: per-weight means (sums / counts), counts and provenance."""

    imatrix: dict[str, np.ndarray]
    counts: dict[str, int]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def write_imatrix_gguf(path, imatrix: dict[str, np.ndarray], counts, dataset_name: str, chunk_count: int, chunk_size: int) -> Path:
    """Write `imatrix` (means) as llama.cpp's imatrix GGUF; `counts` is the token count behind every
    mean (an int, or {name: int}). Sums are stored, as llama.cpp does: in_sum2 = mean * count."""
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "imatrix")
    # gguf-py always adds general.architecture; llama.cpp's imatrix files have none
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, [str(dataset_name)])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
    for name in sorted(imatrix):  # llama.cpp writes them in name order too
        mean = np.asarray(imatrix[name], dtype=np.float64).reshape(-1)
        count = int(counts[name] if isinstance(counts, dict) else counts)
        if count <= 0:
            raise EdgepruneError(f"imatrix entry '{name}' has no tokens behind it (count {count})")
        w.add_tensor(name + _IN_SUM2, (mean * count).astype(np.float32)[None, :])  # ggml [row, 1 matrix]
        w.add_tensor(name + _COUNTS, np.array([[count]], dtype=np.float32))
    write_and_close(w)
    return path


def read_imatrix_gguf(path) -> ImatrixFile:
    """Read an imatrix GGUF (ours or llama.cpp's) back into means and counts."""
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    if (fields.get(gguf.Keys.General.TYPE) is None or fields[gguf.Keys.General.TYPE].contents() != gguf.GGUFType.IMATRIX):
        raise EdgepruneError(f"{path} is not an imatrix GGUF (general.type is not 'imatrix')")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    means, counts = {}, {}
    for tname, sums in tensors.items():
        if not tname.endswith(_IN_SUM2):
            continue
        name = tname[: -len(_IN_SUM2)]
        if name + _COUNTS not in tensors:
            raise EdgepruneError(f"imatrix entry '{name}' has sums but no counts in {path}")
        count = tensors[name + _COUNTS].reshape(-1)
        if count.size != 1:
            raise EdgepruneError(f"imatrix entry '{name}' has {count.size} expert counts: only dense weights are supported")
        counts[name] = int(round(float(count[0])))
        means[name] = (sums.reshape(-1).astype(np.float64) / max(counts[name], 1)).astype(np.float32)

    def value(key, default):
        f = fields.get(key)
        return f.contents() if f is not None else default

    return ImatrixFile(means, counts, list(value(gguf.Keys.IMatrix.DATASETS, [])),
                       int(value(gguf.Keys.IMatrix.CHUNK_COUNT, 0)), int(value(gguf.Keys.IMatrix.CHUNK_SIZE, 0)))
