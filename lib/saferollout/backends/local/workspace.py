"""The workspace folder (`SAFEROLLOUT_HOME`) is private: the rules, and the checks that keep them.

The folder holds what hands over the platform: the admin token (control calls run code as its owner),
endpoint keys and the token signing key (in `state.db`), mirrored request and answer bodies (`metrics.db`).
So:
- the folder is created 0700 and the platform runs with umask 077, so every file it writes (the SQLite
  files and their -wal/-shm included) is 0600 from its first byte;
- a workspace folder, admin token or database that another user owns, or that other users may open, is
  refused with a message naming the file and the fix: the platform never trusts a token it did not write,
  and never keeps writing secrets where others can read them.
"""
from __future__ import annotations

import os
import pwd
import secrets
import stat
from pathlib import Path

from saferollout.errors import BackendError, SpecError

DEFAULT_HOME = ".saferollout"
LOG_NAME = "platform.log"
OUTPUT_NAME = "platform.out"  # the platform process's stdout and stderr, this start's only
PRIVATE_UMASK = 0o077
SECRET_FILES = ("admin.token", "state.db", "state.db-wal", "state.db-shm",
                "metrics.db", "metrics.db-wal", "metrics.db-shm")


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_private(path: Path, what: str, home: Path) -> None:
    """Refuse `path` unless the current user owns it and nobody else may open it (no group/other bits)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    me = os.geteuid()
    if stat.S_ISLNK(info.st_mode):
        raise BackendError(f"refusing {what} {path}: it is a symbolic link; a workspace keeps its own files. "
                           f"Remove it, or use another SAFEROLLOUT_HOME")
    if info.st_uid != me:
        raise BackendError(f"refusing {what} {path}: it is owned by {_user(info.st_uid)}, not by you "
                           f"({_user(me)}), so it may have been planted or read by them. Remove it (or the whole "
                           f"workspace {home}) and start again, or use another SAFEROLLOUT_HOME")
    if info.st_mode & 0o077:
        mode = stat.S_IMODE(info.st_mode)
        raise BackendError(f"refusing {what} {path}: other users may open it (mode {mode:04o}). If you trust "
                           f"what it holds, make the workspace private with `chmod -R go-rwx {home}`; "
                           f"otherwise remove the workspace and start again")


def check_workspace(home: Path) -> None:
    """The folder and every secret file in it are the user's own and closed to others (BackendError if not)."""
    check_private(home, "workspace folder", home)
    for name in SECRET_FILES:
        check_private(home / name, "workspace file", home)


def private_home(home: Path) -> Path:
    """Create the workspace folder 0700 if it is missing, then check it and its secret files."""
    try:
        home.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    check_workspace(home)
    return home


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    return Path(home or os.environ.get("SAFEROLLOUT_HOME") or DEFAULT_HOME).expanduser().resolve()


def admin_token(home: Path) -> str:
    """The workspace admin token, created once with mode 0600 (the workspace checked private first)."""
    private_home(home)
    path = home / "admin.token"
    if not path.exists():
        # written whole under a private name, then linked into place: two processes starting a new
        # workspace at once agree on one token, and neither can read a half-written file
        draft = home / f".admin.token.{os.getpid()}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process won: use its token
        finally:
            draft.unlink()
    return path.read_text().strip()


LOG_MAX_BYTES_ENV = "SAFEROLLOUT_LOG_MAX_BYTES"


def log_max_bytes() -> int:
    """Where platform.log and each instance's log rotate: SAFEROLLOUT_LOG_MAX_BYTES (at least 1024), or 10 MB."""
    text = os.environ.get(LOG_MAX_BYTES_ENV, str(10 * 1024 * 1024))
    if not text.isdigit() or int(text) < 1024:
        raise SpecError(f"{LOG_MAX_BYTES_ENV} must be a whole number of bytes, at least 1024; got {text!r}")
    return int(text)
