"""What every `python -m seed_jax.*` command line shares."""

from __future__ import annotations

from absl import app


def refuse_positional_arguments(argv: list[str]) -> None:
    """Raises a UsageError naming the arguments after the program in `argv` (absl's
    leftovers): settings are flags, and a value given without its flag name (a workdir
    without --workdir=) would otherwise be dropped."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a flag (--workdir=DIR, "
                             "--config.KEY=VALUE, ...)")
