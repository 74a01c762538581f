"""Starting a training model from exports (converted released weights or an
earlier stage): parameters are read straight into their shardings, shapes are
checked against the configured model, and what was and was not loaded is logged."""

from __future__ import annotations

from absl import logging
from flax import nnx

from seed_jax import weights


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def load_into(module: nnx.Module, export_dir: str, *, kinds: tuple[str, ...], shardings: dict,
              require: tuple[str, ...] = (), require_all: bool = False, skip: tuple[str, ...] = ()) -> list[str]:
    """Loads every parameter of the export at `export_dir` that `module` has.

    The export's kind must be in `kinds`; parameters under each prefix in `require`
    (or all of them, with `require_all`) must be present in the export. Parameters
    under a prefix in `skip` are neither read nor checked: they stay at
    initialisation, whatever shape the export gives them. Other parameters the
    export has but `module` lacks are an error (a config that does not fit the
    checkpoint). Returns the loaded paths.
    """
    kind, _, _ = weights.read_config(export_dir)
    if kind not in kinds:
        raise ValueError(f"{export_dir}: holds a {kind!r} export, expected one of {kinds}")
    ours = {k: v for k, v in weights.flat_params(module).items() if not _under(k, skip)}
    stored = {k: v for k, v in weights.stored_shapes(export_dir).items() if not _under(k, skip)}
    extra = sorted(set(stored) - set(ours))
    if extra:
        raise ValueError(f"{export_dir}: parameters the configured model does not have: {extra[:10]}"
                         f"{' ...' if len(extra) > 10 else ''}; does the model config match the checkpoint?")
    wanted = [k for k in ours if require_all or _under(k, require)]
    missing = sorted(k for k in wanted if k not in stored)
    if missing:
        raise KeyError(f"{export_dir}: export lacks parameter(s) {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    keys = {k: ours[k] for k in stored}
    params = weights.load_params(export_dir, keys=keys, shardings={k: shardings[k] for k in keys})
    weights.assign(module, params)
    left = sorted({k.split(".")[0] for k in weights.flat_params(module) if k not in params})
    logging.info("loaded %d parameters from %s (%s export); left at initialisation: %s", len(params),
                 export_dir, kind, ", ".join(left) or "nothing")
    return sorted(params)
