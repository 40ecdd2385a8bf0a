"""Serving beyond this machine: a login is required, it never has to sit on the command line, and the Model box
opens only the folders the operator allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from kvcache.errors import ConfigError
from ui.access import check_exposure, is_loopback, model_roots, read_auth
from ui.handlers import check_model_path
from ui.state import AppState, UserError

ROOT = Path(__file__).resolve().parent.parent


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.org"))


def test_a_login_from_a_file_the_environment_or_the_flag(tmp_path):
    f = tmp_path / "login"
    f.write_text("alice:s3cret:with:colons\nignored\n")
    assert read_auth(None, str(f), env={}) == ("alice", "s3cret:with:colons")
    assert read_auth(None, None, env={"KVQ_AUTH": "bob:pw"}) == ("bob", "pw")
    assert read_auth("carol:pw", None, env={}) == ("carol", "pw")
    assert read_auth("carol:pw", str(f), env={"KVQ_AUTH": "bob:pw"})[0] == "alice"  # the file wins
    assert read_auth(None, None, env={}) is None
    with pytest.raises(ConfigError, match="cannot read --auth-file"):
        read_auth(None, str(tmp_path / "missing"), env={})
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="must hold USER:PASSWORD"):
        read_auth(None, str(tmp_path / "empty"), env={})
    with pytest.raises(ConfigError, match=r"\$KVQ_AUTH must hold USER:PASSWORD"):
        read_auth(None, None, env={"KVQ_AUTH": "nopassword"})


def test_serving_the_network_needs_a_login_or_an_explicit_yes():
    check_exposure("127.0.0.1", None, allow_no_auth=False)
    check_exposure("0.0.0.0", ("a", "b"), allow_no_auth=False)
    check_exposure("0.0.0.0", None, allow_no_auth=True)
    with pytest.raises(ConfigError, match="--host 0.0.0.0 serves everyone.*--auth-file FILE.*--allow-no-auth"):
        check_exposure("0.0.0.0", None, allow_no_auth=False)


def test_the_model_box_opens_only_allowed_roots(tmp_path):
    allowed, other = tmp_path / "models", tmp_path / "elsewhere"
    (allowed / "qwen").mkdir(parents=True)
    other.mkdir()
    assert model_roots("127.0.0.1", None) is None  # this machine only: any path
    assert model_roots("0.0.0.0", None) == []  # beyond it, without roots: 'default' only
    app = AppState(work_root=tmp_path / "work", model_roots=model_roots("0.0.0.0", [str(allowed)]))
    check_model_path(app, "default")
    check_model_path(app, str(allowed / "qwen"))
    for bad in (str(other), str(allowed / ".." / "elsewhere"), "/etc"):
        with pytest.raises(UserError, match="only under the folders its operator allowed"):
            check_model_path(app, bad)
    with pytest.raises(ConfigError, match="is not a folder"):
        model_roots("0.0.0.0", [str(tmp_path / "nope")])


def test_app_refuses_to_serve_the_network_without_a_login():
    """The real entry point, before any model loads: one line, exit 2."""
    out = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0", "--port", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert out.returncode == 2, out.stderr
    [line] = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert "--allow-no-auth" in line and "Traceback" not in out.stderr
