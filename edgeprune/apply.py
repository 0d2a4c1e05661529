"""Physically prune a model by a PrunePlan: fewer layers, thinner FFNs, fewer KV groups.

Removal keeps selected rows of gate/up and columns of down (FFN channel j lives in all three),
and for a KV group g its query heads' rows of q and columns of o, and its rows of k and v.
Biases flagged in the plan are created as zeros here; recovery fills them.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from edgeprune import arch, mapped
from edgeprune.errors import EdgepruneError
from edgeprune.plan import PrunePlan


def _index_list(value, bound: int, what: str) -> None:
    if not isinstance(value, list) or not value:
        raise EdgepruneError(f"plan: {what} must be a non-empty list of indices")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise EdgepruneError(f"plan: {what} must hold integers only")
    if value[0] < 0 or value[-1] >= bound or any(b <= a for a, b in zip(value, value[1:])):
        bad = next((i for i in value if not 0 <= i < bound), None)
        why = f"index {bad} is outside 0..{bound - 1}" if bad is not None else "indices must be sorted and unique"
        raise EdgepruneError(f"plan: {what}: {why}")


def _dims(geometry) -> dict:
    keys = ("num_layers", "ffn", "kv_heads")
    if not isinstance(geometry, dict) or not all(isinstance(geometry.get(k), int) and geometry[k] > 0 for k in keys):
        raise EdgepruneError("plan: its base must record positive integer num_layers, ffn and kv_heads")
    return {k: geometry[k] for k in keys}


def check_plan(plan: PrunePlan, geometry: dict | None = None) -> None:
    """Refuse a plan that cannot be applied to a dense model of `geometry` (num_layers, ffn,
    kv_heads; default: the plan's own base record): no kept layer, layer or channel indices out of
    range, negative, duplicated or unsorted, non-boolean bias flags. One-line EdgepruneErrors,
    before any weight is touched."""
    for name in ("base", "method", "calibration", "achieved"):
        if not isinstance(getattr(plan, name, None), dict):
            raise EdgepruneError(f"plan: '{name}' must be a JSON object")
    dims = _dims(plan.base if geometry is None else geometry)
    if geometry is not None:
        _dims(plan.base)
    layers = plan.layers
    if not isinstance(layers, list) or not layers:
        raise EdgepruneError("plan: 'layers' is empty: a plan must keep at least one decoder layer")
    _index_list([getattr(lp, "index", None) for lp in layers], dims["num_layers"], "the kept layers' 'index'")
    dropped = plan.dropped_layers
    if dropped:
        _index_list(sorted(dropped) if all(isinstance(i, int) for i in dropped) else dropped, dims["num_layers"], "'dropped_layers'")
        if set(dropped) & {lp.index for lp in layers}:
            raise EdgepruneError("plan: a layer is both kept and in 'dropped_layers'")
    for lp in layers:
        _index_list(lp.ffn_keep, dims["ffn"], f"layer {lp.index} 'ffn_keep'")
        _index_list(lp.kv_keep, dims["kv_heads"], f"layer {lp.index} 'kv_keep'")
        if not isinstance(lp.ffn_bias, bool) or not isinstance(lp.attn_out_bias, bool):
            raise EdgepruneError(f"plan: layer {lp.index} 'ffn_bias' and 'attn_out_bias' must be true or false")


def model_geometry(model) -> dict:
    """The dense model's dimensions `check_plan` compares a plan with (read off the modules)."""
    layer = arch.layers(model)[0]
    return {"num_layers": len(arch.layers(model)), "ffn": layer.mlp.down_proj.in_features,
            "kv_heads": layer.self_attn.k_proj.out_features // arch.head_dim(model)}


def _sliced(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def prune_ffn(layer, keep: list[int]) -> None:
    mlp = layer.mlp
    idx = torch.tensor(keep, dtype=torch.long, device=mlp.down_proj.weight.device)
    mlp.gate_proj = _sliced(mlp.gate_proj, rows=idx)
    mlp.up_proj = _sliced(mlp.up_proj, rows=idx)
    mlp.down_proj = _sliced(mlp.down_proj, cols=idx)
    mlp.intermediate_size = len(keep)


def prune_kv_groups(layer, keep: list[int], head_dim: int) -> None:
    attn = layer.self_attn
    n_kv = attn.k_proj.out_features // head_dim
    if len(keep) == n_kv:
        return
    q_per_group = attn.q_proj.out_features // head_dim // n_kv
    dev = attn.q_proj.weight.device
    kv_rows = torch.tensor([g * head_dim + i for g in keep for i in range(head_dim)], dtype=torch.long, device=dev)
    q_rows = torch.tensor(
        [(g * q_per_group + h) * head_dim + i for g in keep for h in range(q_per_group) for i in range(head_dim)],
        dtype=torch.long,
        device=dev,
    )
    attn.q_proj = _sliced(attn.q_proj, rows=q_rows)
    attn.k_proj = _sliced(attn.k_proj, rows=kv_rows)
    attn.v_proj = _sliced(attn.v_proj, rows=kv_rows)
    attn.o_proj = _sliced(attn.o_proj, cols=q_rows)
    attn.num_key_value_groups = q_per_group


def _ensure_bias(lin: nn.Linear) -> None:
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))


def prune_layer(layer, lp, head_dim: int) -> None:
    """Prune one decoder block in place to what its LayerPlan keeps (and create its bias flags as zeros)."""
    if len(lp.ffn_keep) != layer.mlp.down_proj.in_features:
        prune_ffn(layer, lp.ffn_keep)
    prune_kv_groups(layer, lp.kv_keep, head_dim)
    if lp.ffn_bias:
        _ensure_bias(layer.mlp.down_proj)
    if lp.attn_out_bias:
        _ensure_bias(layer.self_attn.o_proj)


def _finish(model, plan: PrunePlan) -> None:
    kept = {lp.index for lp in plan.layers}
    dropped = [layer for i, layer in enumerate(arch.layers(model)) if i not in kept]
    with mapped.releasing(dropped, [model]):  # the dropped layers' memory-mapped weights
        arch.keep_layers(model, sorted(kept))
    model.config.intermediate_size = max(plan.widths()) if plan.layers else model.config.intermediate_size


@torch.no_grad()
def apply_plan(model, plan: PrunePlan) -> None:
    """Prune `model` (the dense base of `plan`) in place."""
    check_plan(plan, model_geometry(model))
    hd = arch.head_dim(model)
    layers = arch.layers(model)
    for lp in plan.layers:
        with mapped.releasing([layers[lp.index]], [layers[lp.index]]):
            prune_layer(layers[lp.index], lp, hd)
    _finish(model, plan)


def pruning_in_place(model, plan: PrunePlan):
    """Prune `model` itself block by block, yielding (index, dense block, pruned block or None, LayerPlan
    or None) in the dense model's order, what block-wise recovery needs (recover.block_pairs is the
    same for two models).

    The dense block is a copy made just before that block is pruned and dropped once the caller moves
    on, so the extra memory is one block, not a second model, and the pages of memory-mapped weights
    the pruned block no longer uses are given back (edgeprune.mapped), the blocks still to come paged
    out until their turn: what lets a 1B model prune in about its pruned size plus one block (issue
    #15). A dropped layer is yielded unpruned (its dense output still feeds the next block's
    targets) and removed when the iteration ends."""
    check_plan(plan, model_geometry(model))
    hd = arch.head_dim(model)
    kept = {lp.index: lp for lp in plan.layers}
    # a calibration pass left every block's mapped weights resident: let them go, each block is read
    # back from the file when its turn comes
    mapped.page_out(mapped.module_tensors(arch.layers(model)))
    for li, layer in enumerate(list(arch.layers(model))):
        lp = kept.get(li)
        if lp is None:
            yield li, layer, None, None
            continue
        with torch.no_grad():
            dense = copy.deepcopy(layer)
            with mapped.releasing([layer], [layer, dense]):  # the replaced weights' mapped pages
                prune_layer(layer, lp, hd)
        yield li, dense, layer, lp
        del dense
    _finish(model, plan)


@contextlib.contextmanager
def masked(model, plan: PrunePlan):
    """Run the dense `model` as if pruned by `plan`, without building the pruned model (fit scores many
    candidate structures: a pruned copy each would cost a model's memory per candidate, issue #15).

    Exact, not approximate: a removed FFN channel's down_proj input and a removed KV group's query
    heads' o_proj inputs are zeroed (every other channel and head computes what it computes in
    the pruned model), and the decoder runs only the kept layers. The plan's bias flags are ignored:
    plans made for the search carry no recovery."""
    check_plan(plan, model_geometry(model))
    hd = arch.head_dim(model)
    layers = arch.layers(model)
    hooks = []

    def zero_except(keep: torch.Tensor):
        return lambda module, args: (args[0] * keep.to(args[0].dtype),) + tuple(args[1:])

    for lp in plan.layers:
        layer = layers[lp.index]
        n = layer.mlp.down_proj.in_features
        if len(lp.ffn_keep) < n:
            keep = torch.zeros(n, device=layer.mlp.down_proj.weight.device)
            keep[lp.ffn_keep] = 1
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(zero_except(keep)))
        n_kv = layer.self_attn.k_proj.out_features // hd
        if len(lp.kv_keep) < n_kv:
            per_group = layer.self_attn.o_proj.in_features // n_kv
            keep = torch.zeros(n_kv, per_group, device=layer.self_attn.o_proj.weight.device)
            keep[lp.kv_keep] = 1
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(zero_except(keep.reshape(-1))))
    model.model.layers = nn.ModuleList([layers[lp.index] for lp in plan.layers])
    try:
        yield model
    finally:
        model.model.layers = layers
        for h in hooks:
            h.remove()
