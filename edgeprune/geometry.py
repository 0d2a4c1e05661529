"""The one geometry type: the shape of a (possibly pruned) decoder-only model, without weights.

`PrunePlan.geometry()` produces it from a plan, `edgeprune.arch.geometry(model)` reads it off a
model's modules; the latency and memory model, the exporters' shape checks, fit and the host
measurement all take it. Torch-free, so `profiles`/`check` stay fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterable

from edgeprune.errors import EdgepruneError


@dataclass(frozen=True)
class LayerShape:
    """One kept decoder layer. n_heads == 0: no attention; ffn == 0: no FFN."""

    n_heads: int
    n_kv_heads: int
    ffn: int
    ffn_bias: bool = False  # bias on down_proj (FLAP compensation / mask folding)
    attn_out_bias: bool = False  # bias on o_proj (FLAP compensation for pruned heads)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelGeometry:
    """Everything the latency model needs to know about a (possibly pruned) decoder of any family.

    `layers` holds the kept decoder layers in order (dropped layers are simply absent). A layer
    with n_heads == 0 has no attention; one with ffn == 0 has no FFN.
    """

    hidden: int
    vocab: int
    head_dim: int
    layers: tuple[LayerShape, ...]
    tied: bool = True
    qkv_bias: bool = False
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for v, what in ((self.hidden, "hidden"), (self.vocab, "vocab"), (self.head_dim, "head_dim")):
            if int(v) <= 0:
                raise EdgepruneError(f"model geometry: {what} must be positive, got {v}")
        for i, s in enumerate(self.layers):
            if s.n_heads < 0 or s.n_kv_heads < 0 or s.ffn < 0:
                raise EdgepruneError(f"model geometry: layer {i} has a negative size ({s})")
            if s.n_kv_heads and s.n_heads % s.n_kv_heads:
                raise EdgepruneError(f"model geometry: layer {i} has {s.n_heads} query heads, not a multiple of {s.n_kv_heads} KV heads")

    # constructors ---------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, name: str = "") -> "ModelGeometry":
        """Read off a torch model's modules (the modules are the truth for a loaded checkpoint)."""
        from edgeprune import arch  # torch: imported only when a model is at hand

        return arch.geometry(model, name)

    @classmethod
    def from_shapes(cls, layers: Iterable[LayerShape | dict], hidden: int, vocab: int, head_dim: int,
                    tied: bool = True, qkv_bias: bool = False, name: str = "") -> "ModelGeometry":
        shapes = tuple(LayerShape(**s) if isinstance(s, dict) else s for s in layers)
        return cls(hidden=int(hidden), vocab=int(vocab), head_dim=int(head_dim), layers=shapes, tied=tied,
                   qkv_bias=qkv_bias, name=name)

    @classmethod
    def uniform(cls, hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn: int, vocab: int,
                head_dim: int | None = None, tied: bool = True, name: str = "") -> "ModelGeometry":
        hd = head_dim or hidden // n_heads
        return cls(hidden, vocab, hd, tuple(LayerShape(n_heads, n_kv_heads, ffn) for _ in range(n_layers)), tied, False, name)

    @classmethod
    def smollm2_135m(cls) -> "ModelGeometry":
        """SmolLM2-135M(-Instruct): 30 layers, d 576, FFN 1536, 9 q / 3 kv heads of 64, vocab 49152, tied."""
        return cls.uniform(576, 30, 9, 3, 1536, 49152, head_dim=64, name="SmolLM2-135M")

    # derived sizes --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def with_layers(self, layers: Iterable[LayerShape], name: str | None = None) -> "ModelGeometry":
        return replace(self, layers=tuple(layers), name=self.name if name is None else name)

    def narrowed(self, ffn_keep: float = 1.0, drop_layers: Iterable[int] = (), align: int = 32) -> "ModelGeometry":
        """Uniformly narrowed FFNs (keep ratio rounded to `align`) without `drop_layers`: a what-if
        for reports and tests; real candidates come from a PrunePlan."""
        drop = set(drop_layers)
        out = [replace(s, ffn=min(s.ffn, max(align, int(round(s.ffn * ffn_keep / align)) * align)) if s.ffn else 0)
               for i, s in enumerate(self.layers) if i not in drop]
        return self.with_layers(out, f"{self.name or 'model'} ffn x{ffn_keep:g}" + (f" -{len(drop)} layers" if drop else ""))

    def layer_tensors(self, s: LayerShape) -> list[tuple[str, int, int]]:
        """(role, out_features, in_features) of each linear weight of one layer."""
        d, hd = self.hidden, self.head_dim
        out: list[tuple[str, int, int]] = []
        if s.n_heads:
            out += [("attn_q", s.n_heads * hd, d), ("attn_k", s.n_kv_heads * hd, d),
                    ("attn_v", s.n_kv_heads * hd, d), ("attn_o", d, s.n_heads * hd)]
        if s.ffn:
            out += [("ffn_gate", s.ffn, d), ("ffn_up", s.ffn, d), ("ffn_down", d, s.ffn)]
        return out

    def layer_small_params(self, s: LayerShape) -> int:
        """Norm weights and biases of one layer (kept in f32 by every exporter)."""
        n = 2 * self.hidden
        if s.n_heads and self.qkv_bias:
            n += (s.n_heads + 2 * s.n_kv_heads) * self.head_dim
        if s.attn_out_bias:
            n += self.hidden
        if s.ffn_bias:
            n += self.hidden
        return n

    def param_counts(self) -> dict[str, int]:
        """Same keys as `edgeprune.arch.param_counts`."""
        attn = ffn = norms = 0
        for s in self.layers:
            for role, o, i in self.layer_tensors(s):
                if role.startswith("attn"):
                    attn += o * i
                else:
                    ffn += o * i
            norms += 2 * self.hidden
            if s.n_heads and self.qkv_bias:
                attn += (s.n_heads + 2 * s.n_kv_heads) * self.head_dim
            attn += self.hidden if s.attn_out_bias else 0
            ffn += self.hidden if s.ffn_bias else 0
        norms += self.hidden
        emb = self.vocab * self.hidden
        head = 0 if self.tied else emb
        return {"embedding": emb, "lm_head_untied": head, "attention": attn, "ffn": ffn, "norms": norms,
                "linear": attn + ffn, "total": emb + head + attn + ffn + norms}

    def linear_params(self) -> int:
        return sum(o * i for s in self.layers for _, o, i in self.layer_tensors(s))

    def attn_width(self) -> int:
        """sum over layers of n_heads * head_dim (attention FLOPs scale with it)."""
        return sum(s.n_heads for s in self.layers) * self.head_dim

    def kv_elements_per_token(self) -> int:
        """K and V elements cached per token of context, all layers."""
        return 2 * sum(s.n_kv_heads for s in self.layers) * self.head_dim

    def to_dict(self) -> dict:
        return {"name": self.name, "hidden": self.hidden, "vocab": self.vocab, "head_dim": self.head_dim,
                "tied": self.tied, "qkv_bias": self.qkv_bias, "n_layers": self.n_layers,
                "layers": [s.to_dict() for s in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelGeometry":
        return cls.from_shapes(d["layers"], d["hidden"], d["vocab"], d["head_dim"], d.get("tied", True),
                               d.get("qkv_bias", False), d.get("name", ""))
