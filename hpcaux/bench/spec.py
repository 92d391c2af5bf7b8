"""The bench file (configs/bench_*.yaml): which base config, K, methods and overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hpcaux.bench.methods import METHODS, REFERENCE, Method, variant
from hpcaux.config import read_yaml_mapping
from hpcaux.errors import UserError


@dataclass
class BenchSpec:
    base: Path
    K: int = 2
    backend: str = "horovod"
    finetune_epochs: int = 2
    methods: list = field(default_factory=lambda: list(METHODS))
    overrides: list = field(default_factory=list)
    quick: list = field(default_factory=list)
    launcher: str = "mpirun -np {ranks} --bind-to none"
    variants: dict = field(default_factory=dict)  # name: {method, overrides, finetune_epochs}
    reference: str = REFERENCE  # the method every speedup and accuracy difference is against
    _variants: dict = field(default_factory=dict, init=False, repr=False)  # name: Method, built by load_bench

    def method(self, name: str) -> Method:
        """A built-in method or one of this file's variants."""
        return METHODS.get(name) or self._variants[name]


def load_bench(path: str | Path) -> BenchSpec:
    path = Path(path)
    raw = read_yaml_mapping(path, "bench file")
    known = set(BenchSpec.__dataclass_fields__) - {"_variants"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"bench file {path} has unknown keys {unknown}; known: {sorted(known)}")
    if "base" not in raw:
        raise UserError(f"bench file {path} needs 'base:', the training config the methods share")
    spec = BenchSpec(**{**raw, "base": (path.parent / raw["base"]).resolve()})
    for name, v in (spec.variants or {}).items():
        if not isinstance(v, dict) or v.get("method") not in METHODS or \
                set(v) - {"method", "overrides", "finetune_epochs", "retired"}:
            raise UserError(f"bench file {path}: variant {name} needs method: one of {list(METHODS)}, "
                            f"and only overrides: [...], finetune_epochs: N and retired: true besides")
        spec._variants[name] = variant(name, v["method"], list(v.get("overrides", [])), v.get("finetune_epochs"),
                                       bool(v.get("retired")))
    bad = [m for m in spec.methods if m not in METHODS and m not in spec._variants]
    if bad:
        raise UserError(f"bench file {path}: unknown methods {bad}; known: {list(METHODS)}")
    if spec.reference not in spec.methods:
        raise UserError(f"bench file {path}: methods must include {spec.reference}, the reference of every ratio")
    if not isinstance(spec.K, int) or spec.K < 2:
        raise UserError(f"bench file {path}: K must be an integer >= 2, got {spec.K!r}")
    if "{ranks}" not in spec.launcher:
        raise UserError(f"bench file {path}: launcher must contain {{ranks}}, got {spec.launcher!r}")
    return spec
