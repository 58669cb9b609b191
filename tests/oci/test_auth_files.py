"""containers-auth.json lookup order and editing, on real files (the network side is in
tests/cli/test_registry_config.py, with skopeo and a real registry)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from cachefs.errors import AuthError, ConfigError
from cachefs.oci.auth import Credentials
from cachefs.oci.auth_files import default_credentials, erase_credentials, store_credentials


def _auth(user: str, pw: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}


def _write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
            "PATH": os.environ.get("PATH", "")}


def test_podman_order_then_docker(tmp_path: Path, env: dict[str, str]) -> None:
    home = Path(env["HOME"])
    _write(home / ".docker/config.json", {"auths": {
        "r.example:5000": _auth("docker", "d"),
        "https://index.docker.io/v1/": _auth("hub", "h")}})
    assert default_credentials("r.example:5000", env) == Credentials("docker", "d")
    assert default_credentials("docker.io", env) == Credentials("hub", "h")
    _write(home / ".config/containers/auth.json", {"auths": {"r.example:5000": _auth("cfg", "c")}})
    assert default_credentials("r.example:5000", env) == Credentials("cfg", "c")
    _write(tmp_path / "run/containers/auth.json", {"auths": {
        "r.example:5000": _auth("run", "r"), "other.example/team": _auth("ns", "n")}})
    assert default_credentials("r.example:5000", env) == Credentials("run", "r")
    assert default_credentials("other.example", env) is None  # namespaced keys are not used
    only = _write(tmp_path / "only.json", {"auths": {}})
    assert default_credentials("r.example:5000", {**env, "REGISTRY_AUTH_FILE": str(only)}) is None


def test_cred_helpers_in_a_containers_auth_file_run(tmp_path: Path, env: dict[str, str]) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-cachefs-test"
    helper.write_text('#!/bin/sh\nread server\n'
                      'printf \'{"ServerURL":"%s","Username":"helped","Secret":"s"}\' "$server"\n')
    helper.chmod(0o755)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    _write(tmp_path / "run/containers/auth.json",
           {"auths": {}, "credHelpers": {"h.example": "cachefs-test"}})
    assert default_credentials("h.example", env) == Credentials("helped", "s")


def test_store_and_erase_keep_other_entries_and_mode(tmp_path: Path, env: dict[str, str]) -> None:
    path = _write(tmp_path / "run/containers/auth.json",
                  {"auths": {"keep.example": _auth("k", "k")}, "credHelpers": {"x": "y"}})
    assert store_credentials("new.example:5000", Credentials("alice", "pw"), env) == path
    doc = json.loads(path.read_text())
    assert doc["auths"]["new.example:5000"] == _auth("alice", "pw")
    assert doc["auths"]["keep.example"] == _auth("k", "k") and doc["credHelpers"] == {"x": "y"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    erase_credentials("new.example:5000", env)
    assert set(json.loads(path.read_text())["auths"]) == {"keep.example"}
    with pytest.raises(AuthError, match="not logged in"):
        erase_credentials("new.example:5000", env)
    erase_credentials(None, env)
    assert json.loads(path.read_text())["auths"] == {}
    assert [p.name for p in path.parent.iterdir()] == ["auth.json"]  # no temp file left


def test_malformed_auth_file_is_a_config_error(tmp_path: Path, env: dict[str, str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=str(bad)):
        default_credentials("x.example", {**env, "REGISTRY_AUTH_FILE": str(bad)})
