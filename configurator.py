"""The nanoGPT configuration convention, with the checks nanoGPT lacks.

    python X.py [config/file.py ...] [--key=value ...]

Each stage declares its settings as a dataclass whose name ends in `Config`. A config file is
plain Python that assigns module-level constants; `--key=value` is read with `ast.literal_eval`
(falling back to a string); a bare `--flag` means True. Later sources win. One config file can
drive every stage of a recipe, so a key owned by another stage is accepted and left to it; a key
that no stage owns is an error naming the closest valid keys. Values must match the declared type.

Below the convention, what every script's run shares: one line and exit 130 for Ctrl-C, even during the
imports; one process at a time per output folder (locked_folder); temporary files that are this process's own.
"""

import ast
import contextlib
import dataclasses
import difflib
import math
import os
import re
import sys
import types

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

ROOT = os.path.dirname(os.path.abspath(__file__))

def quiet_interrupt(kind, value, traceback):
    """Ctrl-C before run_script's handler is in place (torch takes seconds to import): one line and exit 130,
    as run_script does, not a traceback of the import in flight. The scripts import this module first."""
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    sys.__excepthook__(kind, value, traceback)


sys.excepthook = quiet_interrupt


class UserError(Exception):
    """Bad input from the user: the scripts print its message as one line and exit."""


def keys_of_all_stages():
    """Every settable key in the repository, found by reading (not importing) the root scripts,
    so that `prepare.py` does not pay for importing torch just to validate a shared config file."""
    keys = set()
    for name in sorted(os.listdir(ROOT)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
                keys.update(s.target.id for s in node.body
                            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name))
    return keys


def read_config_file(path):
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found (configs live in config/, e.g. config/gpt_51m.py)")
    namespace = {}
    try:
        exec(compile(open(path, encoding="utf-8").read(), path, "exec"), namespace)
    except Exception as e:
        raise UserError(f"config file {path} failed to run: {type(e).__name__}: {e}") from e
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def coerce(key, value, field_type):
    """Return `value` as `field_type`, or raise a UserError that says what was expected."""
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
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            value = float(value)  # what a config file's float("nan") gives: said to be not finite, not a type error
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
            raise UserError(f"unexpected argument {arg!r}: pass a config file (config/x.py) or --key=value")
    owned = {f.name: f.type for cls in config_classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - owned.keys() - keys_of_all_stages())
    if unknown:
        valid = owned.keys() | keys_of_all_stages()
        hints = "; ".join(f"{k!r}: did you mean {', '.join(difflib.get_close_matches(k, valid, n=3, cutoff=0.5)) or 'nothing close'}?"
                          for k in unknown)
        raise UserError(f"unknown config key {hints}")
    return {k: coerce(k, v, owned[k]) for k, v in raw.items() if k in owned}


def build(config_class, overrides, **base):
    """An instance of `config_class` from its defaults, then `base`, then the explicit `overrides`."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{**base, **{k: v for k, v in overrides.items() if k in names}})


def check_at_least(cfg, **lowest):
    """Refuse, before any work, a setting below the lowest value that makes sense for it."""
    for key, low in lowest.items():
        if not getattr(cfg, key) >= low:  # NaN too
            raise UserError(f"--{key} must be at least {low}, got {getattr(cfg, key)}")


def check_writable(path, key):
    """Refuse an output path that cannot be written before the work, not after it."""
    if os.path.isdir(path):
        raise UserError(f"--{key}={path} is a folder; give a file name")
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise UserError(f"--{key}={path}: folder {os.path.dirname(path)} does not exist; create it or pick another path")


# ----------------------------------------------------------------------------- one process per folder

def temp_path(path):
    """A temporary name beside `path` that is this process's own: two processes never write the same one."""
    return f"{path}.{os.getpid()}.tmp"


@contextlib.contextmanager
def made_dir(path):
    """Make `path` and its missing parents; on the way out (after a failure, say) remove those left empty."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: create its target "
                        "or remove the link")
    created, parent = [], os.path.normpath(path)
    while parent and not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {path}: {e.strerror}") from None
    try:
        yield
    finally:
        for made in created:  # the deepest first
            if not os.listdir(made):
                os.rmdir(made)


@contextlib.contextmanager
def locked_folder(path, script):
    """Hold `path` (made if missing) for one process: a second one fails at once, in one line naming this one.
    The lock is the operating system's (flock on path/.lock), released when the process dies, so even a kill -9
    leaves no stale lock. The temporary files a dead holder left are removed once the lock is taken."""
    with made_dir(path):
        if fcntl is None:  # Windows has no flock: there a folder is not locked
            yield
            return
        lock_path = os.path.join(path, ".lock")
        fd = take_lock(lock_path, path, script)
        try:
            for name in os.listdir(path):
                if re.fullmatch(r".+\.\d+\.tmp", name) and os.path.isfile(os.path.join(path, name)):
                    os.remove(os.path.join(path, name))
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):  # removed while still locked: a process that opened it
                os.remove(lock_path)                      # in the meantime sees that and retries on a new file
            os.close(fd)


def take_lock(lock_path, folder, script):
    """The open, locked lock file, with this process named in it; a UserError naming the holder if it is taken."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in {folder}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{folder} is in use by {holder}: one process at a time per folder; wait for it to "
                            "end, or stop it") from None
        except OSError as e:  # a file system without locks
            os.close(fd)
            raise UserError(f"cannot lock {folder}: {e.strerror}; put it on a local disk") from None
        try:  # the holder may have removed the file between our open and our lock: then lock the new one
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{script} (pid {os.getpid()})".encode())
    return fd


def run_script(main):
    """Every script's command line: main(sys.argv[1:]), where a UserError is its one line (exit 1), Ctrl-C exits
    130, and a reader that leaves early (`... | head`) ends it quietly. train.py and sft.py return the signal
    that stopped their run: the exit code is the shell's for it (130 for Ctrl-C), so `train.py && sft.py` stops."""
    try:
        stopped_by = main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would fail on the same pipe: stdout goes to devnull first
        # (Python docs, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(128 + stopped_by if isinstance(stopped_by, int) and stopped_by else 0)
