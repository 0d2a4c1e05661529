"""Decoder blocks on an accelerator one at a time (issue #15): `edgeprune prune --offload`.

The model stays where it was loaded -- the CPU, its safetensors weights memory-mapped -- and the
block-by-block passes (the calibration pass, the sequential lstsq refit) take each block to the
accelerator for its turn only. The accelerator then holds one dense block (two while lstsq refits a
pruned one against its dense copy), the calibration hidden states and one consumer's least-squares
system: a model larger than the accelerator's memory still prunes there.

Everything that runs the whole model at once -- self-generated calibration text, distillation, LoRA,
the sensitivity allocation -- is not streamed: with --offload it runs on the CPU or is refused. Models
that need several accelerators at once are accelerate's `device_map` / offload territory, not this.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def visiting(module, device, keep: bool = False):
    """`module`'s parameters and buffers on `device` inside the with-block.

    Its own tensors are set aside, not copied, and put back afterwards as they were (memory-mapped
    weights stay mapped and nothing grows on the CPU); with keep=True what the module holds by then
    -- a block pruned and refit on the device, new parameters included -- comes back instead."""
    device = torch.device(device) if device is not None else None
    slots = [(store, key, t) for m in (module.modules() if module is not None else ())
             for store in (m._parameters, m._buffers) for key, t in store.items() if t is not None]
    if device is None or all(t.device == device for _, _, t in slots):
        yield module
        return
    where = slots[0][2].device
    for store, key, t in slots:  # device copies in the module's slots; the originals wait here
        moved = t.detach().to(device)
        store[key] = torch.nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else moved
    try:
        yield module
    finally:
        if keep:
            module.to(where)
        else:
            for store, key, t in slots:
                store[key] = t


def to_device(obj, device):
    """A block's context (rotary tables, masks: tensors in tuples, lists and dicts) on `device`."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
