"""Config keys that left the table: what a config or run directory that still names one
means now. Old run directories must keep loading (resume, `hpcaux eval`, the benches'
cost model reads the overrides of runs on record), so a key is never simply deleted: it
moves, folds into another key's value, or retires with the one behaviour that remains
(docs/results.md says why for each; docs/configuration.md lists them)."""
from hpcaux.errors import UserError

# Keys retired after measurements, with the one behaviour that remains: a config that
# names one is read as before when it asks for that behaviour (None: any value, the key
# having meant something only with a retired choice, or now decided by other keys: the
# exchange relays wherever it keeps a graph for a returned gradient, lp.relay).
RETIRED = {"lp.finetune_schedule": "continue", "lp.finetune_lr": None, "lp.consistency": "mutual",
           "lp.exchange_warmup": 0, "lp.relay": None}
# Keys folded into another: the value that still means something, and what it sets.
FOLDED = {"lp.multipliers": {"per_sample": ("lp.loss", "al"), "none": None},
          "lp.real_source": {"exchange": None, "store": ("lp.real_inputs", "stored")}}
# Keys moved: the new key takes the value. A run saved with lp.microbatches fine-tuned
# with parallel.microbatches; it now fine-tunes with its layer-parallel phase's M.
MOVED = {"lp.microbatches": "parallel.microbatches", "lp.finetune_epochs": "train.finetune_epochs"}

OLD_KEYS = RETIRED.keys() | FOLDED.keys() | MOVED.keys()


def translate(key: str, raw) -> list[tuple[str, object]]:
    """The (key, value) settings an old `key: raw` stands for today (none: read and
    ignored), or a UserError where it asks for a behaviour that is gone."""
    if key in MOVED:
        return [(MOVED[key], raw)]
    if key in FOLDED:
        if raw not in FOLDED[key]:
            raise UserError(f"config key '{key}' is folded into another: it takes only {', '.join(FOLDED[key])} "
                            "(docs/configuration.md)")
        return [FOLDED[key][raw]] if FOLDED[key][raw] is not None else []
    if RETIRED[key] is not None and raw != RETIRED[key]:
        raise UserError(f"config key '{key}' was retired: only {RETIRED[key]} remains (docs/results.md); "
                        "drop the key")
    return []
