"""Render docs/configuration.md from the config dataclasses (a test keeps it in sync).

    python -m hpcaux.config_doc > docs/configuration.md
"""

from hpcaux.config import Config, all_keys, value_of
from hpcaux.config_history import FOLDED, MOVED, RETIRED
from hpcaux.config_rules import INERT_UNLESS


def _describe(f) -> str:
    meta, notes = f.metadata, []
    if "choices" in meta:
        notes.append("one of " + ", ".join(f"`{c}`" for c in meta["choices"]))
    for bound, sign in (("min", ">="), ("max", "<="), ("min_exclusive", ">")):
        if bound in meta:
            notes.append(f"{sign} {meta[bound]}")
    if "help" in meta:
        notes.insert(0, meta["help"])
    return "; ".join(notes)


def render_reference() -> str:
    defaults = Config()
    lines = ["# Configuration reference", "",
             "Generated from `hpcaux/config.py` by `python -m hpcaux.config_doc`; a test fails when it is stale.",
             "Set keys in a YAML file (nested by section) or on the command line as `key=value`",
             "(`hpcaux train --config configs/x.yaml optim.lr=0.05 parallel.cuts=[4]`).", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, (typ, f) in all_keys().items():
        value = value_of(defaults, key)
        name = getattr(typ, "__name__", str(typ).replace("typing.", ""))
        lines.append(f"| `{key}` | {name} | `{value}` | {_describe(f)} |")
    lines += ["", "Keys that act only under another setting: in a layer-parallel config, a value other than",
              "the default where the key does nothing is an error naming it (a serial run ignores the",
              "lp and auxnet sections, which a bench's base config shares with its layer-parallel rows):", ""]
    for key, _, needs in INERT_UNLESS:
        lines.append(f"* `{key}`{' (every key of the section)' if '.' not in key else ''}: needs {needs}.")
    lines += ["", "Keys no longer in the table (docs/results.md says why), still read from older configs and",
              "run directories:", ""]
    for key, target in FOLDED.items():
        meaning = ", ".join(f"`{v}` sets `{t[0]}: {t[1]}`" if t else f"`{v}` does nothing" for v, t in target.items())
        lines.append(f"* `{key}`: folded into another key; {meaning}.")
    for key, target in MOVED.items():
        lines.append(f"* `{key}`: moved to `{target}`, which it sets.")
    for key, kept in RETIRED.items():
        lines.append(f"* `{key}`: retired; " + (f"`{kept}` (what remains) is read and ignored, any other value is an "
                                                 "error." if kept is not None else "read and ignored."))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
