"""One calibration pass, block by block, collecting what every pruning method needs.

The inputs of block 0 (token embeddings) are captured once; then each decoder block runs over
all calibration sequences before the next one starts, so peak memory is one block plus two
copies of the hidden states, and the lm_head never runs.

Per block this records
  * coarse importance: mean per-token angular distance arccos(cos(h_in, h_out)) / pi (CFSP) and
    mean 1 - cos(h_in, h_out) (ShortGPT's Block Influence, used by COMP to drop layers);
  * at the input X of down_proj (the FFN channels) and of o_proj (the attention heads):
    sum x^2, sum x over tokens in float64, so norms, means and exact variances follow;
  * optionally the Gram matrix X^T X of those inputs (FASP's least-squares restoration);
  * optionally llama.cpp's importance matrix (mean x^2 at the input of every weight it quantizes,
    the output projection's from the final norm): the same numbers `imatrix.collect_imatrix`
    gets from a second forward pass of the whole model, here for the price of the hooks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from edgeprune import arch
from edgeprune.offload import to_device, visiting


@dataclass
class ChannelStats:
    sumsq: torch.Tensor  # [n] float64
    sum: torch.Tensor  # [n] float64
    tokens: int = 0
    gram: torch.Tensor | None = None  # [n, n] float64, X^T X

    @classmethod
    def empty(cls, n: int, gram: bool) -> "ChannelStats":
        z = torch.zeros(n, dtype=torch.float64)
        return cls(z.clone(), z.clone(), 0, torch.zeros(n, n, dtype=torch.float64) if gram else None)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        xd = x.double()  # reduced where x lives (an accelerator), accumulated on the CPU
        self.sumsq += (xd * xd).sum(0).cpu()
        self.sum += xd.sum(0).cpu()
        self.tokens += x.shape[0]
        if self.gram is not None:
            self.gram += (x.T @ x).double().cpu()

    @property
    def norm(self) -> torch.Tensor:  # ||X_j||_2 over calibration tokens
        return self.sumsq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    @property
    def var(self) -> torch.Tensor:  # exact population variance, float64
        return (self.sumsq / max(self.tokens, 1) - self.mean**2).clamp_min(0)


@dataclass
class BlockStats:
    angular: float  # mean arccos(cos(h_in, h_out)) / pi
    one_minus_cos: float  # mean 1 - cos(h_in, h_out)
    ffn: ChannelStats  # at down_proj input
    attn: ChannelStats  # at o_proj input


@dataclass
class CalibrationStats:
    blocks: list[BlockStats]
    tokens: int
    seconds: float
    description: dict = field(default_factory=dict)
    imatrix: dict | None = None  # {GGUF tensor name: float32 mean x^2 per input column}, with imatrix=True

    @property
    def angular(self) -> list[float]:
        return [b.angular for b in self.blocks]

    @property
    def block_influence(self) -> list[float]:
        return [b.one_minus_cos for b in self.blocks]



def block_output(out):
    """A decoder layer's hidden-state output (transformers returns a tensor or a tuple, by version)."""
    return out[0] if isinstance(out, tuple) else out

def rotary(model, seqlen: int, like: torch.Tensor) -> dict:
    """What every decoder block of `model` needs besides its input, for causal sequences of `seqlen`
    tokens without padding: rotary tables (Gemma 3: global and local ones) and, for sliding-window
    layers, the window mask (sdpa applies plain causality itself when the mask is None)."""
    position_ids = torch.arange(seqlen, device=like.device)[None]
    inner = model.model
    if not hasattr(inner, "rotary_emb_local"):
        return {"position_ids": position_ids, "position_embeddings": inner.rotary_emb(like, position_ids)}
    window = getattr(model.config, "sliding_window", None)
    q = torch.arange(seqlen, device=like.device)
    near = (q[:, None] - q[None, :] >= 0) & (q[:, None] - q[None, :] < window) if window and window < seqlen else None
    return {"position_ids": position_ids, "position_embeddings_global": inner.rotary_emb(like, position_ids),
            "position_embeddings_local": inner.rotary_emb_local(like, position_ids),
            "masks": {"sliding_attention": None if near is None else near[None, None], "full_attention": None}}


@torch.no_grad()
def embed(model, ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model.model.embed_tokens(ids[i : i + batch_size].to(device)) for i in range(0, len(ids), batch_size)])


def block_kwargs(layer, position: dict) -> dict:
    """`rotary()`'s context as this block's keyword arguments."""
    kwargs = {k: v for k, v in position.items() if k != "masks"}
    masks = position.get("masks")
    kwargs["attention_mask"] = masks.get(getattr(layer, "attention_type", "full_attention")) if masks else None
    return kwargs


@torch.no_grad()
def run_block(layer, hidden: torch.Tensor, position: dict, batch_size: int = 8) -> torch.Tensor:
    """Run one decoder block over all sequences (causal attention, no padding, no cache)."""
    kwargs = block_kwargs(layer, position)
    outs = []
    for i in range(0, len(hidden), batch_size):
        out = layer(hidden[i : i + batch_size], use_cache=False, **kwargs)
        outs.append(block_output(out))
    return torch.cat(outs)


def _cos_stats(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, float]:
    # Clamp: blocks that barely change a token give cos a hair above 1 and arccos NaN.
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1).clamp(-1.0, 1.0)
    return float((torch.arccos(cos) / math.pi).mean()), float((1 - cos).mean())


@torch.no_grad()
def calibrate(model, ids: torch.Tensor, gram: bool = False, batch_size: int = 8, progress=None, description=None,
              imatrix: bool = False, block_device=None) -> CalibrationStats:
    """Run the dense model block by block over `ids` [nsamples, seqlen] and collect BlockStats.
    block_device: run each block there, one at a time, the model staying where it is (offload.py)."""
    from edgeprune.imatrix import SquareSums, block_linears, head_name

    start = time.perf_counter()
    squares = SquareSums() if imatrix else None
    hidden = embed(model, ids, batch_size)
    position = to_device(rotary(model, ids.shape[1], hidden[:1]), block_device)
    hidden = to_device(hidden, block_device)
    blocks = []
    layers = arch.layers(model)
    for li, layer in enumerate(layers):
        ffn = ChannelStats.empty(layer.mlp.down_proj.in_features, gram)
        attn = ChannelStats.empty(layer.self_attn.o_proj.in_features, gram)
        hooks = [
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: ffn.add(a[0])),
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: attn.add(a[0])),
        ]
        if squares is not None:
            hooks += [lin.register_forward_pre_hook(squares.hook(name)) for name, lin in block_linears(model, li, layer)]
        try:
            with visiting(layer, block_device):
                out = run_block(layer, hidden, position, batch_size)
        finally:
            for h in hooks:
                h.remove()
        angular, one_minus_cos = _cos_stats(hidden, out)
        blocks.append(BlockStats(angular, one_minus_cos, ffn, attn))
        hidden = out
        if progress:
            progress(li + 1, len(layers))
    head = head_name(model) if squares is not None else None
    if head is not None:
        with visiting(model.model.norm, block_device):
            for i in range(0, len(hidden), batch_size):
                squares.add(head, model.model.norm(hidden[i : i + batch_size]))
    return CalibrationStats(blocks, int(ids.numel()), time.perf_counter() - start, description or {},
                            squares.means() if squares is not None else None)
