"""PrunePlan: the one object that flows from scoring to pruning to export.

A plan says, for the base model it was made for, which decoder layers stay and, in each, which
FFN channels and which KV groups (a KV head with its query heads) are kept. It is versioned
JSON; the same model, data and seed give a byte-identical file (sorted keys, no timestamps).
Timings and other run facts go to report.json, never here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeprune.geometry import LayerShape, ModelGeometry
from edgeprune.errors import EdgepruneError

PLAN_VERSION = 1

# Every plan's `method` record has these keys, whoever wrote it (prune.make_plan, fit's dense
# plan, an older file): readers never guess which shape they got.
METHOD_DEFAULTS = {"method": "none", "allocation": "none", "score": "none", "sparsity": 0.0, "target": "ffn",
                   "drop_layers": 0, "align": 1, "temperature": None, "min_keep": None, "seed": 0, "heads": False,
                   "recover": "none", "recover_args": {}, "shapes": "per-layer"}


@dataclass
class LayerPlan:
    index: int  # index of the layer in the base model
    ffn_keep: list[int]  # kept FFN channels (sorted, indices into the base layer's FFN)
    kv_keep: list[int]  # kept KV groups (sorted); each group carries its query heads
    ffn_bias: bool = False  # down_proj gets a bias (compensation / folded mask), values come from recovery
    attn_out_bias: bool = False

    def shape(self, queries_per_group: int) -> LayerShape:
        return LayerShape(
            n_heads=len(self.kv_keep) * queries_per_group,
            n_kv_heads=len(self.kv_keep),
            ffn=len(self.ffn_keep),
            ffn_bias=self.ffn_bias,
            attn_out_bias=self.attn_out_bias,
        )


@dataclass
class PrunePlan:
    base: dict  # id, fingerprint, num_layers, hidden, ffn, heads, kv_heads, head_dim, vocab
    method: dict  # allocation, score, sparsity, target, align, temperature, min_keep, drop_layers, seed, ...
    calibration: dict  # source, nsamples, seqlen, seed, tokens
    layers: list[LayerPlan]  # kept layers only, in order
    dropped_layers: list[int] = field(default_factory=list)
    achieved: dict = field(default_factory=dict)  # sparsities and parameter counts
    version: int = PLAN_VERSION

    def __post_init__(self):
        if isinstance(self.method, dict):
            self.method = {**METHOD_DEFAULTS, **self.method}

    @property
    def queries_per_group(self) -> int:
        return self.base["heads"] // self.base["kv_heads"]

    def layer_shapes(self) -> list[LayerShape]:
        return [lp.shape(self.queries_per_group) for lp in self.layers]

    def geometry(self) -> ModelGeometry:
        """The pruned model's geometry, from the plan alone (no model is built): what the latency
        model, fit and the exporters' shape checks read."""
        b = self.base
        return ModelGeometry(hidden=b["hidden"], vocab=b["vocab"], head_dim=b["head_dim"], layers=tuple(self.layer_shapes()),
                             tied=bool(b.get("tied_embeddings", True)), qkv_bias=bool(b.get("qkv_bias", False)),
                             name=str(b.get("id", "")))

    def widths(self) -> list[int]:
        return [len(lp.ffn_keep) for lp in self.layers]

    def kv_groups_removed(self) -> int:
        """KV groups gone from the kept layers (a dropped layer's are not counted)."""
        return sum(self.base["kv_heads"] - len(lp.kv_keep) for lp in self.layers)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        if not isinstance(data, dict):  # a plan file holding a list or a number
            raise EdgepruneError(f"malformed plan: expected a JSON object, got {type(data).__name__}")
        if data.get("version") != PLAN_VERSION:
            raise EdgepruneError(f"plan version {data.get('version')} is not supported (this edgeprune reads version {PLAN_VERSION})")
        try:
            layers = [LayerPlan(**lp) for lp in data["layers"]]
            return cls(
                base=data["base"],
                method=data["method"],
                calibration=data["calibration"],
                layers=layers,
                dropped_layers=list(data.get("dropped_layers", [])),
                achieved=data.get("achieved", {}),
                version=data["version"],
            )
        except (KeyError, TypeError) as exc:
            raise EdgepruneError(f"malformed plan: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        path = Path(path)
        if not path.is_file():
            raise EdgepruneError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise EdgepruneError(f"{path} is not a text file: a plan is JSON written by edgeprune prune") from None
        except json.JSONDecodeError as exc:
            raise EdgepruneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)

    def check_base(self, base: dict) -> None:
        """Refuse a plan made for another model (different weights or geometry)."""
        if self.base.get("fingerprint") != base.get("fingerprint"):
            raise EdgepruneError(
                f"this plan was made for model {self.base.get('id')} (sha256 {str(self.base.get('fingerprint'))[:12]}), "
                f"not {base.get('id')} (sha256 {str(base.get('fingerprint'))[:12]}): prune that model or make a new plan"
            )
        for key in ("num_layers", "hidden", "ffn", "heads", "kv_heads"):
            if self.base.get(key) != base.get(key):
                raise EdgepruneError(f"plan geometry mismatch on {key}: plan {self.base.get(key)} vs model {base.get(key)}")


def base_description(model, model_id: str, fingerprint: str) -> dict:
    cfg = model.config
    return {
        "id": model_id,
        "fingerprint": fingerprint,
        "num_layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "ffn": cfg.intermediate_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "vocab": cfg.vocab_size,
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "qkv_bias": bool(getattr(cfg, "attention_bias", False)),
    }
