"""Files that must survive a crash, and folders that one process writes at a time.

Every file that is replaced is written to a temporary name of this process's own, flushed, and
renamed over the old one, so a reader sees the old file or the new one, never half of it. A folder
that a script writes (a run's out_dir, a dataset's data/<name>) is locked with the operating
system's flock on its .lock file: a second writer stops at once naming the first, and a kill -9
leaves no stale lock. Readers (a training reading its dataset) share the lock. No torch here:
prepare.py imports this module.
"""

import contextlib
import ctypes
import glob
import json
import os
import re
import signal
import sys

from configurator import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock, so folders are not locked there
    fcntl = None


def temp_path(path):
    """A temporary name beside `path` that is this process's own: two processes never share one."""
    return f"{path}.{os.getpid()}.tmp"


def replace_atomically(path, write, mode="w"):
    """write(file) into a temporary file, flushed to the disk, then renamed over `path`. A failure
    (a full disk, a read-only folder) is one line and leaves the previous file as it was. torch.save
    reports a full disk as a RuntimeError, not an OSError, so that is caught too."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"could not write {path}: {reason}; the previous "
                        f"{os.path.basename(path)}, if any, is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomically(path, text):
    replace_atomically(path, lambda f: f.write(text))


def read_log(out_dir):
    """The records of out_dir/log.jsonl (the format in DESIGN.md); a torn last line is skipped."""
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


@contextlib.contextmanager
def made_dir(path):
    """Make `path` and its missing parents; on the way out remove those left empty."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: "
                        "create its target or remove the link")
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
        for made in created:  # the deepest first; a lock of a refused run is all it may hold
            if os.listdir(made) == [".lock"]:
                os.remove(os.path.join(made, ".lock"))
            if not os.listdir(made):
                os.rmdir(made)


@contextlib.contextmanager
def locked_folder(path, script, shared=False):
    """Hold `path` (made if missing) while the block runs: alone, or with shared=True beside other
    readers. A holder that is refused is one line naming who holds it. Once held alone, the
    temporary files that killed writers left are removed. The .lock file stays: removing it would
    let a newcomer lock a new file while an old holder still holds the removed one."""
    with made_dir(path):
        if fcntl is None:
            yield
            return
        try:
            fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in {path}: {e.strerror}") from None
        reader = os.path.join(path, f".reader.{os.getpid()}")
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{path} is in use by {holders(path, fd)}: wait for it to end, or "
                                "stop it") from None
            except OSError as e:  # a file system without locks
                raise UserError(f"cannot lock {path}: {e.strerror}; use a local disk") from None
            name = f"{script} (pid {os.getpid()})".encode()
            if shared:  # each reader names itself in a file of its own
                with open(reader, "wb") as f:
                    f.write(name)
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, name, 0)
                stale = [*left_by_the_dead(path, r".+"), *glob.glob(os.path.join(
                    glob.escape(path), ".reader.*"))]  # no reader is left while we hold it alone
                for name in stale:
                    with contextlib.suppress(IsADirectoryError, FileNotFoundError):
                        os.remove(name)
            yield
        finally:
            if shared:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(reader)
            os.close(fd)  # releases the lock


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def left_by_the_dead(folder, name):
    """Paths in `folder` named temp_path(<name pattern>) whose process has ended: what killed
    writers left. A live process's own, even another program's, is never touched."""
    for entry in os.listdir(folder):
        found = re.fullmatch(rf"({name})\.(\d+)\.tmp", entry)
        if found and not alive(int(found[2])):
            yield os.path.join(folder, entry)


def holders(path, fd):
    """Who holds `path`: the writer named in .lock, or the readers that are still alive."""
    readers = []
    for name in glob.glob(os.path.join(glob.escape(path), ".reader.*")):
        try:
            if alive(int(name.rsplit(".", 1)[1])):  # else killed before it removed its file
                with open(name, encoding="utf-8") as f:
                    readers.append(f.read().strip())
        except (OSError, ValueError):
            continue
    if readers:
        return " and ".join(readers) + " (reading it)"
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"


def die_with_parent():
    """Called in a child process (a pool's worker, a sweep's train.py): on Linux the kernel sends it
    SIGTERM when its parent dies, so that a parent killed with kill -9 leaves no orphan at work."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before the call: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)
