"""PeltConfig: which methods a task uses, each with its own config, plus options shared by all gates.

Serialises to plain dicts (JSON, Hydra) and back. Method names and their config classes come from the method
registry, so adding a method needs no change here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .gates import GATE_POOLINGS
from .methods import MethodConfig, method_class


@dataclass
class PeltConfig:
    methods: dict[str, MethodConfig] = field(default_factory=dict)
    gate_pooling: str = "masked"  # "masked": average gates over real tokens; "all": include padding (original code)
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.gate_pooling not in GATE_POOLINGS:
            raise ValueError(f"gate_pooling {self.gate_pooling!r} is not one of {GATE_POOLINGS}")
        self.methods = {
            name: cfg if isinstance(cfg, MethodConfig) else method_class(name).config_class.from_dict(cfg)
            for name, cfg in self.methods.items()
        }
        for name, cfg in self.methods.items():
            expected = method_class(name).config_class
            if not isinstance(cfg, expected):
                raise TypeError(f"method {name!r} needs a {expected.__name__}, got {type(cfg).__name__}")

    @property
    def gated(self) -> list[str]:
        return [name for name, cfg in self.methods.items() if cfg.gate]

    def to_dict(self) -> dict:
        return {
            "methods": {name: cfg.to_dict() for name, cfg in self.methods.items()},
            "gate_pooling": self.gate_pooling,
            "head_dropout": self.head_dropout,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PeltConfig":
        data = dict(data)
        allowed = {"methods", "gate_pooling", "head_dropout"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown PeltConfig option(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(methods=dict(data.get("methods") or {}), **{k: v for k, v in data.items() if k != "methods"})


def preset(name: str, **overrides) -> PeltConfig:
    """The method presets of the paper: finetune, headonly, bitfit, adapter, houlsby, prefix, lora,
    unipelt_ap / _apl / _aplb and their `_nogate` ablations."""
    single = {
        "finetune": {"finetune": {}},
        "headonly": {},
        "bitfit": {"bitfit": {}},
        "adapter": {"adapter": {"placement": "pfeiffer"}},
        "houlsby": {"adapter": {"placement": "houlsby"}},
        "prefix": {"prefix": {}},
        "lora": {"lora": {}},
    }
    letters = {"a": ("adapter", {"placement": "pfeiffer"}), "p": ("prefix", {}), "l": ("lora", {}), "b": ("bitfit", {})}
    if name in single:
        methods = single[name]
    elif name.startswith("unipelt_"):
        combo, _, suffix = name[len("unipelt_") :].partition("_")
        if suffix not in ("", "nogate") or not combo or set(combo) - set(letters):
            raise ValueError(f"unknown preset {name!r}: use unipelt_<letters from a,p,l,b>[_nogate]")
        methods = {letters[c][0]: {**letters[c][1], "gate": suffix != "nogate"} for c in combo}
    else:
        raise ValueError(
            f"unknown preset {name!r}; choose from: {', '.join(single)}, unipelt_<letters a,p,l,b>[_nogate] (e.g. unipelt_apl)"
        )
    return PeltConfig(methods={k: dict(v) for k, v in methods.items()}, **overrides)
