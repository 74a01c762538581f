"""What every `python -m seed_jax.*` command line shares, and the `--config=FILE[:ARG]
--config.KEY=VALUE` flags of `python -m seed_jax.main`."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shlex
import sys

import ml_collections
from absl import app, flags

from seed_jax import config_files

CONFIG_FLAG = "config"  # seed_jax.main's config file flag; its fields are overridden as --config.KEY=VALUE


class ConfigError(ValueError):
    """A setting (or workdir) a run cannot start with, found before it starts: the
    message says what to change, so `python -m seed_jax.main` prints it without a traceback."""


@contextlib.contextmanager
def config_checks():
    """Re-raises a ValueError or FileNotFoundError raised inside as a ConfigError: around the
    checks a trainer makes of its config, workdir and the files they name before it starts."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error


@contextlib.contextmanager
def flag_checks():
    """Re-raises a ValueError or FileNotFoundError raised inside as an absl UsageError: around
    the checks a program makes of the folders and files its flags name before it works, so
    `app.run` prints the message and the flags' help, not a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from error


def user_path(path: str | None) -> str | None:
    """`path` with a leading `~` or `~user` made that user's home directory, as a shell
    makes it in `--out ~/x` but not in `--out=~/x` (os.path.expanduser); None stays."""
    return None if path is None else os.path.expanduser(path)


def checked_out_file(flag: str, path: str) -> str:
    """`path` (`user_path`; "" stays), the file a program writes its results to after its work,
    with its folder made now: a ValueError naming `flag` where a folder stands at the path or
    its folder cannot be made (a file in the way), before the work rather than after it."""
    if not path:
        return path
    path = user_path(path)
    if os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a directory: give a file name for the results")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag}={path}: its folder {folder} cannot be made: {error}") from None
    return path


def expand_user_paths(config: ml_collections.ConfigDict) -> None:
    """Makes each setting of `config` (at any depth) that starts with `~` its user's home
    directory (`user_path`), in place: `--config.data.train_dir=~/data` names ~/data, not
    a folder "~" in the current directory."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            expand_user_paths(value)
        elif isinstance(value, str) and value.startswith("~"):
            config[key] = user_path(value)


def refuse_positional_arguments(argv: list[str]) -> None:
    """Raises a UsageError naming the arguments after the program in `argv` (absl's
    leftovers): settings are flags, and a value given without its flag name (a workdir
    without --workdir=) would otherwise be dropped."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a flag (--workdir=DIR, "
                             "--config.KEY=VALUE, ...)")


def checked_workdir(workdir: str | None) -> str | None:
    """`--workdir`'s value (None: not given), else a UsageError: for "" (an unset variable in
    `--workdir=$DIR` trained into the default workdir) and for a path a file blocks; a
    leading `~` is the home directory (`user_path`)."""
    if workdir == "":
        raise app.UsageError("--workdir is empty: give a directory, or leave the flag out for the default "
                             "./workdirs/<trainer>_<preset>")
    workdir = existing = user_path(workdir)
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise app.UsageError(f"--workdir={workdir}: {existing} is a file, not a directory")
    return workdir


def parse_config_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flags_parser for a command line with `--config=FILE[:ARG]`: absl's
    (`app.parse_flags_with_usage`), except that a config file that does not exist and an
    override naming no field of the config (`--config.stage1.num_step=5`) are reported as
    absl reports a bad flag, naming the flag (and the fields nearest a misspelt one),
    not as ml_collections' tracebacks; so is a preset the config file refuses; on the
    command line or in a `--flagfile`."""
    arguments = flag_arguments(argv)
    problem = config_file_problem(arguments)
    if problem is None:
        try:
            return app.parse_flags_with_usage(last_config_only(argv, arguments))
        except (AttributeError, KeyError):  # what ml_collections raises for an override of no field
            problem = unknown_override(arguments)
            if problem is None:
                raise
    sys.stderr.write(f"FATAL Flags parsing error: {problem}\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def flag_arguments(argv: list[str]) -> list[str]:
    """The arguments after the program in `argv` that absl reads as flags: each
    `--flagfile=FILE` replaced by the flags FILE holds (as absl reads them), up to a `--`.
    A flagfile that cannot be read is left as it is, for absl to report."""
    try:
        arguments = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    except flags.Error:
        arguments = list(argv[1:])
    return arguments[:arguments.index("--")] if "--" in arguments else arguments


def config_flag_spans(arguments: list[str]) -> list[tuple[int, int]]:
    """Where each `--config=VALUE` (or `--config VALUE`) stands among the flag `arguments`
    (`flag_arguments`), in order: (first, last + 1) indices of its one or two arguments."""
    spans, i = [], 0
    while i < len(arguments):
        if re.fullmatch(f"--?{CONFIG_FLAG}", arguments[i]) and i + 1 < len(arguments):
            spans.append((i, i + 2))
            i += 2
            continue
        if re.match(f"--?{CONFIG_FLAG}=", arguments[i]):
            spans.append((i, i + 1))
        i += 1
    return spans


def config_flag_values(arguments: list[str]) -> list[str]:
    """The values of each `--config=VALUE` (or `--config VALUE`) among the flag
    `arguments` (`flag_arguments`), in order: absl takes the last."""
    return [arguments[stop - 1].split("=", 1)[1] if stop - start == 1 else arguments[stop - 1]
            for start, stop in config_flag_spans(arguments)]


def last_config_only(argv: list[str], arguments: list[str]) -> list[str]:
    """`argv` without the `--config` flags before the last. `arguments` are `argv`'s
    `flag_arguments` (its flagfiles read), which stand in for its flags where it has
    several `--config` flags. absl takes the last, but ml_collections applies every
    override to each config it loads, so an override of a field only the last one has
    failed on an earlier one (launch/local_multiprocess.sh gives its own `--config`
    before the caller's flags, which may replace it)."""
    spans = config_flag_spans(arguments)
    if len(spans) < 2:
        return argv
    dropped = {i for start, stop in spans[:-1] for i in range(start, stop)}
    after_flags = argv[argv.index("--"):] if "--" in argv else []
    return [argv[0]] + [a for i, a in enumerate(arguments) if i not in dropped] + after_flags


def config_file_problem(arguments: list[str]) -> str | None:
    """What is wrong when the file of a `--config` among the flag `arguments`
    (`flag_arguments`) does not exist, or its `get_config` refuses the argument after
    the colon (a ValueError: an unknown preset), else None: the last or an earlier one,
    which the last replaces (`last_config_only`) but which names a mistake all the same."""
    for value in config_flag_values(arguments):
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            return f"flag --{CONFIG_FLAG}={value}: config file {path!r} does not exist"
        try:
            config_files.load(*value.split(":", 1))
        except ValueError as error:
            return f"flag --{CONFIG_FLAG}={value}: {error}"
    return None


def override_key(arg: str) -> str | None:
    """The dotted field an override names ("stage1.num_steps" for `--config.stage1.num_steps=5`
    or `--noconfig.data.flip`), None for any other argument."""
    match = re.match(f"--?(?:no)?{CONFIG_FLAG}\\.([^=]+)", arg)
    return match.group(1) if match else None


def unknown_override(arguments: list[str]) -> str | None:
    """What is wrong with the first override among the flag `arguments` (`flag_arguments`)
    that names no field of the config `--config` loads, else None."""
    values = config_flag_values(arguments)
    if not values:
        return None
    config = config_files.load(*values[-1].split(":", 1))
    for arg in arguments:
        key = override_key(arg)
        problem = None if key is None else missing_field(config, key)
        if problem:
            return f"flag {arg}: {problem}"
    return None


def missing_field(config: ml_collections.ConfigDict, key: str) -> str | None:
    """Why the dotted `key` names no field of `config` (with the names nearest its first
    unknown part), or None when it names one."""
    node, path = config, []
    for name in key.split("."):
        where = ".".join(path) or "the config"
        if not isinstance(node, ml_collections.ConfigDict):
            return f"no config field {key}: {where} is {node!r}, not a group of fields"
        if name not in node:
            field = ".".join([*path, name])
            near = difflib.get_close_matches(name, list(node.keys()), n=3)
            if near:
                return f"no config field {field}; did you mean {' or '.join('.'.join([*path, n]) for n in near)}?"
            return f"no config field {field}; {where} has {', '.join(sorted(node.keys()))}"
        node, path = node[name], [*path, name]
    return None


def override_flag(key: str, value) -> str:
    """`--config.KEY=VALUE` as a shell passes it on and ml_collections parses it back to
    `value` (a config.json leaf, where a tuple field's value is a list)."""
    if isinstance(value, (list, tuple)):
        text = repr(tuple(value))
    else:
        text = value if isinstance(value, str) else repr(value)
    return shell_word(f"--{CONFIG_FLAG}.{key}={text}")


def shell_word(arg: str) -> str:
    """`arg` as one word of a POSIX shell: as it is where it needs no quotes, in double quotes
    where they suffice (a tuple's 'names' stay readable), else in shlex's quotes."""
    if shlex.quote(arg) == arg:
        return arg
    return f'"{arg}"' if not set(arg) & set('"$`\\!') else shlex.quote(arg)
