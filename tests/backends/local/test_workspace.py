"""The workspace is private: modes from the first byte, files of other users refused, tokens that expire.

Where another user matters, the test runs commands as `nobody` (setpriv); it is skipped, with the reason,
where that is not possible. Workspaces here sit in a folder every user may traverse, so only the
workspace's own modes stand between `nobody` and its files.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.client import start_platform, stop_platform
from saferollout.backends.local.gateway import _b64, check_token, issue_token
from saferollout.backends.local.workspace import SECRET_FILES
from saferollout.errors import BackendError
from saferollout.specs import EndpointSpec


def _second_user_reason() -> str | None:
    if os.geteuid() != 0:
        return "running commands as `nobody` needs root (setpriv changes user only as root)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    try:
        import grp
        import pwd
        pwd.getpwnam("nobody"), grp.getgrnam("nogroup")
    except KeyError:
        return "this machine has no user `nobody` or group `nogroup`"
    return None


SECOND_USER = _second_user_reason()
needs_second_user = pytest.mark.skipif(SECOND_USER is not None, reason=SECOND_USER or "")


def as_nobody(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def shared_dir():
    """A folder every user may enter (as /tmp or a shared project folder), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="saferollout-shared-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        stop_platform(folder / "ws")
        shutil.rmtree(folder, ignore_errors=True)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def daemon_umask(home: Path) -> int:
    pid = json.loads((home / "platform.json").read_text())["pid"]
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Umask:"))
    return int(line.split()[1], 8)


@needs_second_user
def test_the_workspace_and_its_secrets_are_closed_to_other_users(shared_dir):
    home = shared_dir / "ws"
    backend = LocalBackend(home)
    backend.create_endpoint(EndpointSpec(name="private-ep", auth_mode="key"))
    backend.get_credentials("private-ep")
    assert mode(home) == 0o700
    present = [home / name for name in SECRET_FILES if (home / name).exists()]
    assert {p.name for p in present} >= {"admin.token", "state.db", "state.db-wal", "metrics.db"}
    assert {p.name: mode(p) for p in present} == {p.name: 0o600 for p in present}
    assert daemon_umask(home) == 0o077  # so every file it writes is private from its first byte
    for path in [home, *present]:
        peek = as_nobody("cat", str(path)) if path.is_file() else as_nobody("ls", str(path))
        assert peek.returncode != 0 and "Permission denied" in peek.stderr, path


def test_a_workspace_folder_open_to_others_is_refused_with_the_fix(shared_dir):
    home = shared_dir / "ws"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    with pytest.raises(BackendError) as refused:
        LocalBackend(home).list_endpoints()
    assert str(refused.value) == (
        f"refusing workspace folder {home}: other users may open it (mode 0755). If you trust what it holds, "
        f"make the workspace private with `chmod -R go-rwx {home}`; otherwise remove the workspace and start again")
    assert not (home / "admin.token").exists() and not (home / "platform.json").exists()


@needs_second_user
def test_an_admin_token_planted_by_another_user_is_refused(shared_dir):
    home = shared_dir / "ws"
    home.mkdir()
    home.chmod(0o777)  # a folder anyone may write to, as a workspace under /tmp would be
    planted = as_nobody("sh", "-c", f"printf planted > {home / 'admin.token'}")
    assert planted.returncode == 0, planted.stderr
    home.chmod(0o700)  # the owner closes the folder, but the planted token is still there
    with pytest.raises(BackendError, match=r"refusing workspace file .*/admin\.token: it is owned by nobody "
                                           r"\(uid 65534\), not by you"):
        start_platform(home, timeout=30)
    # the platform itself refuses it too, whoever starts it
    daemon = subprocess.run([sys.executable, "-m", "saferollout.backends.local.daemon", "--home", str(home)],
                            capture_output=True, text=True, timeout=60)
    assert daemon.returncode == 3
    assert "admin.token: it is owned by nobody (uid 65534)" in daemon.stderr
    assert not (home / "platform.json").exists()


def test_a_secret_file_open_to_others_is_refused_with_the_fix(tmp_path):
    home = tmp_path / "ws"
    LocalBackend(home).list_endpoints()
    stop_platform(home)
    (home / "state.db").chmod(0o644)
    with pytest.raises(BackendError, match=r"refusing workspace file .*/state\.db: other users may open it "
                                           r"\(mode 0644\)\. If you trust what it holds, make the workspace "
                                           r"private with `chmod -R go-rwx .*`"):
        start_platform(home, timeout=30)


def forged(key: bytes, claims_json: str) -> str:
    import hashlib
    import hmac
    payload = _b64(claims_json.encode())
    return f"{payload}.{_b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())}"


@pytest.mark.parametrize("expiry", ["NaN", "Infinity", "-Infinity", '"never"', "true", "null", "[1]"])
def test_a_token_expiry_must_be_a_finite_number(expiry):
    key = b"k" * 32
    token = forged(key, f'{{"endpoint": "ep", "exp": {expiry}, "nonce": "x"}}')
    assert check_token(key, "ep", token) == "invalid token: its expiry is not a finite number"
    assert check_token(key, "ep", forged(key, '{"endpoint": "ep", "nonce": "x"}')) == \
        "invalid token: its expiry is not a finite number"
    assert check_token(key, "ep", forged(key, "[1, 2]")) == "invalid token"
    assert check_token(key, "ep", issue_token(key, "ep", 60)[0]) is None
