"""From calibration statistics to a PrunePlan: the one planning entry point (`make_plan`) for every
method, its options, and pruning in memory (`pruned_copy`); saving is a separate call
(pipeline.prune_and_save, checkpoint.save_pruned). What each method keeps is methods.py; the
budget is budget.py.
"""

from __future__ import annotations

import copy
import json
import math

from edgeprune import allocate, arch, methods
from edgeprune.apply import apply_plan
from edgeprune.budget import TARGETS, achieved, validate_sparsity
from edgeprune.calibrate import CalibrationStats
from edgeprune.errors import EdgepruneError
from edgeprune.families import family_of
from edgeprune.importance import FFN_SCORES
from edgeprune.plan import PrunePlan
from edgeprune.recover import CLOSED_FORM as CLOSED_FORM_RECOVERIES, bias_flags, check_recover_args

METHODS = ("cfsp", "uniform", "flap", "fasp", "comp")
SHAPES = ("auto", "per-layer", "uniform")  # auto: per-layer where the model's GGUF architecture can hold them
TRAINED_RECOVERIES = ("lora", "kd")  # retraining on calibration tokens: LoRA on next-token loss, or distillation
RECOVERIES = ("none",) + CLOSED_FORM_RECOVERIES + TRAINED_RECOVERIES
COMP_SCORES = ("condition",) + FFN_SCORES
NATIVE_RECOVERY = {"cfsp": "none", "uniform": "none", "flap": "bias", "fasp": "lstsq", "comp": "mask"}  # each paper's own
# What `--recover` defaults to: the paper's own, except that CFSP (and uniform) also get the sequential
# lstsq refit. It is retraining-free and never raises a block's held-out error (recover.py), and it is
# what brings the default below the CFSP authors' perplexity by more than allocation and scores alone
# (benchmarks/prune_quality.py).
DEFAULT_RECOVERY = {**NATIVE_RECOVERY, "cfsp": "lstsq", "uniform": "lstsq"}
DEFAULT_SCORE = {"cfsp": "cfsp", "uniform": "cfsp", "flap": "flap", "fasp": "wanda-sp", "comp": "condition"}
DEFAULT_TARGET = {"cfsp": "ffn", "uniform": "ffn", "flap": "linear", "fasp": "ffn", "comp": "ffn"}


# ------------------------------------------------------------------------------------ options
def parse_recover(recover: str | None, method: str) -> list[str]:
    """'bias', 'lstsq+lora', 'none', None (the method's native recovery) -> ordered list of steps."""
    if recover is None:
        recover = DEFAULT_RECOVERY[method]
    steps = [s.strip() for s in str(recover).split("+") if s.strip()]
    bad = [s for s in steps if s not in RECOVERIES]
    if bad or not steps:
        raise EdgepruneError(f"--recover must be one of {', '.join(RECOVERIES)} (or one of bias, lstsq, mask + lora or kd, e.g. bias+kd), got '{recover}'")
    if steps == ["none"]:
        return []
    if "none" in steps:
        raise EdgepruneError(f"--recover none cannot be combined with other recoveries, got '{recover}'")
    closed = [s for s in steps if s in CLOSED_FORM_RECOVERIES]
    if len(closed) > 1:
        raise EdgepruneError(f"--recover takes at most one of bias, lstsq, mask (each re-fits the same weights), got '{recover}'")
    trained = [s for s in steps if s in TRAINED_RECOVERIES]
    if len(trained) > 1 or (trained and steps[-1] != trained[0]):
        raise EdgepruneError(f"--recover: lora or kd comes last, once (e.g. bias+lora, lstsq+kd), got '{recover}'")
    return steps


def resolve_options(method: str = "cfsp", score: str | None = None, target: str | None = None,
                    allocation: str | None = None, heads: bool | None = None, recover: str | None = None,
                    recover_args: dict | None = None) -> dict:
    """Check a method's options and fill its defaults, before any model is loaded (one-line errors)."""
    if method not in METHODS:
        raise EdgepruneError(f"--method must be one of {', '.join(METHODS)}, got {method}")
    target = target or DEFAULT_TARGET[method]
    if target not in TARGETS:
        raise EdgepruneError(f"--target must be one of {', '.join(TARGETS)}, got {target}")
    if method == "uniform":
        if allocation not in (None, method):
            raise EdgepruneError("--method uniform is itself the allocation: --allocation does not apply")
        allocation = method
    elif method == "cfsp":
        if allocation not in (None, "cfsp", "sensitivity"):
            raise EdgepruneError(f"--method cfsp takes --allocation cfsp (block importance, the default) or sensitivity, got {allocation}")
        allocation = allocation or "cfsp"
    elif method == "flap":
        if allocation not in (None, "global"):
            raise EdgepruneError("--method flap ranks all layers together (global allocation): --allocation does not apply")
        allocation = "global"
    else:
        allocation = allocation or "uniform"
        if allocation not in allocate.ALLOCATIONS:
            raise EdgepruneError(f"--allocation must be one of {', '.join(allocate.ALLOCATIONS)}, got {allocation}")
    if method == "flap":
        if score not in (None, "flap"):
            raise EdgepruneError("--method flap ranks by its fluctuation metric: --score does not apply (try --method uniform --score flap)")
    score = score or DEFAULT_SCORE[method]
    if score not in COMP_SCORES:
        raise EdgepruneError(f"--score must be one of {', '.join(COMP_SCORES)}, got {score}")
    if method == "comp" and heads:
        raise EdgepruneError("--method comp prunes layers and FFN neurons, not heads: drop --heads (or use flap, fasp, cfsp)")
    heads = (method == "flap") if heads is None else bool(heads)
    steps = parse_recover(recover, method)
    recover_args = {k: v for k, v in (recover_args or {}).items() if v is not None}
    for kind, flag in (("lora", "lora"), ("kd", "kd")):
        keys = [k for k in recover_args if k.startswith(kind + "_")]
        if keys and kind not in steps:
            names = ", ".join("--recover-time" if k == "kd_seconds" else "--" + k.replace("_", "-") for k in sorted(keys))
            raise EdgepruneError(f"{names} only apply with --recover {flag} (or X+{flag})")
    recover_args = check_recover_args(steps, recover_args)
    return {"method": method, "score": score, "target": target, "allocation": allocation, "heads": heads,
            "recover": "+".join(steps) or "none", "recover_args": recover_args}


def gguf_safe_args(model, recover: str | None, recover_args: dict | None = None) -> dict:
    """`recover_args` plus lstsq_intercept=False where lstsq runs on a family that no GGUF architecture
    reads down/o-projection biases for (Qwen3, Gemma 3): the intercept would be a bias llama.cpp
    cannot load. An explicit lstsq_intercept is left as the caller gave it."""
    args = dict(recover_args or {})
    steps = [s for s in (recover or "").split("+")]
    if "lstsq" in steps and args.get("lstsq_intercept") is None and not family_of(model).gguf_reads({"attn_output", "ffn_down"}):
        args["lstsq_intercept"] = False
    return args


def check_shapes(shapes: str, method: str = "cfsp") -> None:
    """The --shapes value is known and the method can honour it (checked before any model loads)."""
    if shapes not in SHAPES:
        raise EdgepruneError(f"--shapes must be one of {', '.join(SHAPES)}, got {shapes}")
    if shapes == "uniform" and method == "flap":
        raise EdgepruneError("--method flap ranks every layer's units together and gives each layer its own shape: "
                             "use --method cfsp or uniform for --shapes uniform (or --shapes per-layer and export ONNX)")


def resolve_shapes(shapes: str, model=None, family=None, method: str = "cfsp") -> str:
    """"per-layer" or "uniform"; "auto" asks the model's family whether its GGUF can hold per-layer shapes."""
    check_shapes(shapes, method)
    if shapes == "auto":
        shapes = "per-layer" if (family or family_of(model)).per_layer_gguf else "uniform"
        check_shapes(shapes, method)  # auto may have chosen uniform for a method that cannot honour it
    return shapes


def needs_gram(method: str = "cfsp", score: str | None = None, recover: str | None = None) -> bool:
    """Whether the calibration pass must collect Gram matrices (mask tuning, the condition metric;
    lstsq refits on the pruned network's own inputs and builds what it needs itself)."""
    score = score or DEFAULT_SCORE.get(method, "cfsp")
    steps = parse_recover(recover, method) if method in METHODS else []
    return score == "condition" or "mask" in steps


def default_drop_layers(method: str, num_layers: int) -> int:
    return max(1, int(math.floor(num_layers / 15 + 0.5))) if method == "comp" else 0


# -------------------------------------------------------------------------------- the dispatcher
def make_plan(
    model,
    stats: CalibrationStats,
    base: dict,
    sparsity: float,
    method: str = "cfsp",
    target: str | None = None,
    allocation: str | None = None,
    score: str | None = None,
    drop_layers: int | None = None,
    heads: bool | None = None,
    align: int = 32,
    temperature: float = allocate.DEFAULT_TEMPERATURE,
    min_keep: float = 0.05,
    seed: int = 0,
    recover: str | None = None,
    recover_args: dict | None = None,
    shapes: str = "auto",
    ids=None,
    progress=None,
) -> PrunePlan:
    """A PrunePlan for any method; `recover` (None = the method's native one) is recorded in it.

    shapes: "per-layer" (each layer its own width and heads), "uniform" (one shape for all: the
    allocation becomes uniform, the method's scores still choose which channels and groups stay),
    or "auto" (uniform when the model's family has no GGUF architecture for per-layer shapes).
    ids: the calibration token ids, needed by allocation "sensitivity" (it measures the model on them)."""
    validate_sparsity(sparsity)
    opts = resolve_options(method, score, target, allocation, heads, recover, recover_args)
    opts["recover_args"] = check_recover_args(opts["recover"].split("+") if opts["recover"] != "none" else [],
                                              gguf_safe_args(model, opts["recover"], recover_args))
    uniform = resolve_shapes(shapes, model, method=method) == "uniform"
    if drop_layers is None:
        drop_layers = default_drop_layers(method, len(arch.layers(model)))
    if opts["score"] == "condition" and stats.blocks and stats.blocks[0].ffn.gram is None:
        raise EdgepruneError("the condition score needs Gram matrices: calibrate with gram=True")
    common = dict(sparsity=sparsity, target=opts["target"], drop_layers=drop_layers, align=align,
                  temperature=temperature, min_keep=min_keep, seed=seed)
    if uniform:
        opts["allocation"] = "uniform"  # one shape everywhere: the method's scores still choose what stays
    if method == "flap":
        plan = methods.flap_plan(model, stats, base, heads=opts["heads"], **common)
    else:
        if opts["allocation"] == "sensitivity" and not uniform and ids is None:
            raise EdgepruneError("--allocation sensitivity measures the model on the calibration tokens: pass ids to make_plan")
        plan = methods.ranked_plan(model, stats, base, opts["allocation"], opts["score"], opts["heads"], uniform=uniform,
                                   ids=ids, progress=progress, **common)
    plan.method.update({"method": method, "allocation": opts["allocation"], "score": opts["score"], "heads": opts["heads"]})
    plan = with_recovery(plan, opts["recover"], opts["recover_args"])
    plan.achieved = achieved(model, plan)
    if opts["heads"]:
        plan.achieved["kv_groups"] = [len(lp.kv_keep) for lp in plan.layers]
    return plan


def with_recovery(plan: PrunePlan, recover: str | None, recover_args: dict | None = None) -> PrunePlan:
    """A copy of `plan` that records `recover` and carries the bias flags it needs (same kept units).

    Lets one selection be tried with several recoveries without re-planning."""
    method = plan.method["method"]
    steps = parse_recover(recover, method if method in METHODS else "cfsp")
    args = check_recover_args(steps, {k: v for k, v in (recover_args or {}).items() if v is not None})
    new = PrunePlan.from_dict(json.loads(plan.to_json()))
    new.method.update({"recover": "+".join(steps) or "none", "recover_args": args})
    ffn_b, attn_b = bias_flags(new.method["recover"], args)
    for lp in new.layers:
        lp.ffn_bias = ffn_b and len(lp.ffn_keep) < new.base["ffn"]
        lp.attn_out_bias = attn_b and len(lp.kv_keep) < new.base["kv_heads"]
    return new




def pruned_copy(model, plan: PrunePlan):
    """A pruned deep copy of the dense `model` (the dense model stays intact for comparisons)."""
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    return pruned
