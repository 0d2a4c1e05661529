"""Importance scores: which FFN channels (and KV groups) of a block matter most.

Every score is "higher = keep". All scores of one block are computed from the same calibration
statistics (see calibrate.py); X is the input of down_proj, tokens x n.

  activation : ||X_j||_2                     (what CFSP's released code effectively ranks by)
  cfsp       : ||X_j||_2 * (a_down_j + a_up_j + a_gate_j), a_*_j = |W_*[channel j]|_1 divided by
               the mean of that quantity over the block's channels: a weight-aware relative score
               normalised *across* channels (the paper's idea; the code's per-channel
               normalisation cancels the weights)
  wanda-sp   : ||X_j||_2 * sum_i |W_down[i, j]|   (Wanda, summed over the column = structured)
  magnitude  : ||[W_gate[j]; W_up[j]; W_down[:, j]]||_2   (no data)
  random     : seeded uniform noise (a floor for every comparison)
  flap       : Var(X_j) * ||W_down[:, j]||_2^2   (FLAP's fluctuation metric, WIFV)
"""

from __future__ import annotations

import torch

from edgeprune.calibrate import BlockStats, ChannelStats

FFN_SCORES = ("cfsp", "activation", "wanda-sp", "magnitude", "random", "flap")


def _channel_l1(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mlp = layer.mlp
    return (
        mlp.down_proj.weight.detach().abs().sum(0).double(),
        mlp.up_proj.weight.detach().abs().sum(1).double(),
        mlp.gate_proj.weight.detach().abs().sum(1).double(),
    )


def ffn_scores(name: str, layer, stats: BlockStats, seed: int = 0, layer_index: int = 0) -> torch.Tensor:
    """Scores [n] for the FFN channels of `layer` (float64, higher = more important)."""
    x: ChannelStats = stats.ffn
    if name == "activation":
        return x.norm
    if name == "cfsp":
        down, up, gate = _channel_l1(layer)
        rel = down / down.mean() + up / up.mean() + gate / gate.mean()
        return x.norm * rel
    if name == "wanda-sp":
        return x.norm * _channel_l1(layer)[0]
    if name == "magnitude":
        mlp = layer.mlp
        sq = (
            mlp.down_proj.weight.detach().double().pow(2).sum(0)
            + mlp.up_proj.weight.detach().double().pow(2).sum(1)
            + mlp.gate_proj.weight.detach().double().pow(2).sum(1)
        )
        return sq.sqrt()
    if name == "random":
        g = torch.Generator().manual_seed(seed * 100003 + layer_index)
        return torch.rand(x.sumsq.shape[0], generator=g, dtype=torch.float64)
    if name == "flap":
        return x.var * layer.mlp.down_proj.weight.detach().double().pow(2).sum(0)
    raise ValueError(f"unknown FFN score '{name}' (choose from {', '.join(FFN_SCORES)})")


def kv_group_scores(name: str, layer, stats: BlockStats, head_dim: int, seed: int = 0, layer_index: int = 0) -> torch.Tensor:
    """Scores [n_kv] for the KV groups of `layer`: a group = one KV head with its query heads.

    The per-channel score at the o_proj input is computed like the FFN score at down_proj
    (fluctuation for FLAP, ||X|| x column weight for the rest) and averaged over the group's
    query-head channels.
    """
    attn = layer.self_attn
    x: ChannelStats = stats.attn
    w = attn.o_proj.weight.detach().double()
    if name == "flap":
        per_channel = x.var * w.pow(2).sum(0)
    elif name == "magnitude":
        per_channel = w.pow(2).sum(0).sqrt()
    elif name == "random":
        g = torch.Generator().manual_seed(seed * 100003 + 7919 + layer_index)
        per_channel = torch.rand(w.shape[1], generator=g, dtype=torch.float64)
    else:
        per_channel = x.norm * w.abs().sum(0)
    n_kv = attn.k_proj.out_features // head_dim
    return per_channel.view(n_kv, -1).mean(1)
