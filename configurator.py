"""The nanoGPT configuration convention, with the checks nanoGPT lacks.

    python X.py [config/file.py ...] [--key=value ...]

Each stage declares its settings as a dataclass whose name ends in `Config`. A config file is plain
Python that assigns module-level constants; `--key=value` is read with `ast.literal_eval` (falling
back to a string); a bare `--flag` means True. Later sources win. One config file can drive every
stage of a recipe, so a key owned by another stage is accepted and left to it; a key that no stage
owns is an error naming the closest valid keys. Values must match the declared type.

run_script gives every script the same ending: a UserError is one line and exit 1, Ctrl-C exit 130.
"""

import ast
import dataclasses
import difflib
import math
import os
import sys
import types

ROOT = os.path.dirname(os.path.abspath(__file__))


def quiet_interrupt(kind, value, traceback):
    """Ctrl-C before run_script's handler is in place (torch takes seconds to import): one line and
    exit 130, not a traceback of the import in flight. The scripts import this module first."""
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    sys.__excepthook__(kind, value, traceback)


sys.excepthook = quiet_interrupt


class UserError(Exception):
    """Bad input from the user: the scripts print its message as one line and exit."""


def keys_of_all_stages():
    """Every settable key in the repository, found by reading (not importing) the root scripts, so
    that prepare.py does not pay for importing torch just to check a shared config file."""
    keys = set()
    for name in sorted(os.listdir(ROOT)):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
                    keys.update(s.target.id for s in node.body
                                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name))
    return keys


def read_config_file(path):
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found (configs live in config/, e.g. "
                        "config/gpt_51m.py)")
    namespace = {}
    try:
        with open(path, encoding="utf-8") as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except (Exception, SystemExit) as e:  # a config file that calls exit() is broken too
        raise UserError(f"config file {path} failed to run: {type(e).__name__}: {e}") from e
    skipped = (types.ModuleType, types.FunctionType, type)  # imports and helpers, not settings
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, skipped)}


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coerce(key, value, field_type):
    """`value` as `field_type`, or a UserError that says what was expected."""
    if field_type is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif field_type is int:
        if isinstance(value, float) and value.is_integer():  # lets people write --max_tokens=1e9
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif field_type is float:
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf"):
            value = float(value)  # said to be not finite below, not a type error
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{key} must be a finite number, got {value}")
            return float(value)
    elif field_type is str:
        return value if isinstance(value, str) else str(value)
    elif isinstance(value, field_type):
        return value
    raise UserError(f"{key} must be {field_type.__name__}, got {value!r} ({type(value).__name__})")


def parse(argv, *config_classes):
    """Read config files and overrides from `argv`; return {key: value} for the keys that were set
    explicitly and that one of `config_classes` owns, each coerced to its declared type."""
    raw = {}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            raw[key.replace("-", "_")] = parse_value(text) if sep else True
        elif arg.endswith(".py"):
            raw.update(read_config_file(arg))
        else:
            raise UserError(f"unexpected argument {arg!r}: pass a config file (config/x.py) or "
                            "--key=value")
    owned = {f.name: f.type for cls in config_classes for f in dataclasses.fields(cls)}
    valid = owned.keys() | keys_of_all_stages()
    unknown = sorted(set(raw) - valid)
    if unknown:
        close = {k: ", ".join(difflib.get_close_matches(k, valid, n=3, cutoff=0.5))
                 for k in unknown}
        hints = "; ".join(f"{k!r}" + (f": did you mean {close[k]}?" if close[k] else "")
                          for k in unknown)
        raise UserError(f"unknown config key {hints} (the keys are the fields of the script's "
                        "config dataclass, at its top)")
    return {k: coerce(k, v, owned[k]) for k, v in raw.items() if k in owned}


def build(config_class, overrides, **base):
    """An instance of `config_class` from its defaults, then `base`, then the explicit `overrides`.
    A class that checks itself (__post_init__ raising ValueError) fails in one line."""
    names = {f.name for f in dataclasses.fields(config_class)}
    try:
        return config_class(**{**base, **{k: v for k, v in overrides.items() if k in names}})
    except ValueError as e:
        raise UserError(str(e)) from None


def check_at_least(cfg, **lowest):
    """Refuse, before any work, a setting below the lowest value that makes sense for it."""
    for key, low in lowest.items():
        if not getattr(cfg, key) >= low:  # NaN too
            raise UserError(f"--{key} must be at least {low}, got {getattr(cfg, key)}")


def check_writable(path, key):
    """The output path, refused before the work (not after it) where it cannot be written."""
    if os.path.isdir(path):
        raise UserError(f"--{key}={path} is a folder; give a file name")
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise UserError(f"--{key}={path}: folder {os.path.dirname(path)} does not exist")
    return path


def run_script(main):
    """Every script's command line: main(sys.argv[1:]), where a UserError is its one line (exit 1),
    Ctrl-C exits 130, and a reader that leaves early (`... | head`) ends it quietly. train.py and
    sft.py return the signal that stopped their run: the exit code is the shell's for it."""
    try:
        stopped_by = main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # Python flushes stdout again at exit: point it at devnull first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(128 + stopped_by if isinstance(stopped_by, int) and stopped_by else 0)
