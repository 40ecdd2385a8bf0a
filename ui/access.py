"""Who may use the app when it is served beyond this machine, and what its Model box may open.

On 127.0.0.1 (the default) only this machine reaches the page. On any other address everyone on the
network does, and the Model box loads any path on the server: so a non-loopback host needs a login
(``--auth-file``, ``$KVQ_AUTH`` or ``--auth``), unless the operator says ``--allow-no-auth``; and the
Model box then opens only 'default' and folders under the operator's ``--model-root`` folders, and Hub ids
(which may download into the server's Hugging Face cache) only with ``--allow-hub``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

from kvcache.errors import ConfigError

AUTH_ENV = "KVQ_AUTH"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _user_password(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{where} must hold USER:PASSWORD (both non-empty)")
    return user, password


def read_auth(auth: str | None, auth_file: str | None, env: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """The login from ``--auth-file`` (first line), ``$KVQ_AUTH`` or ``--auth``, in that order of preference."""
    if auth_file:
        path = Path(auth_file).expanduser()
        try:
            first = path.read_text(encoding="utf-8").splitlines()[:1]
        except OSError as exc:
            raise ConfigError(f"cannot read --auth-file {path} ({exc.strerror}): give a file holding USER:PASSWORD") from None
        return _user_password(first[0] if first else "", f"--auth-file {path}")
    if env.get(AUTH_ENV):
        return _user_password(env[AUTH_ENV], f"${AUTH_ENV}")
    if auth:
        return _user_password(auth, "--auth")
    return None


def check_exposure(host: str, login: tuple[str, str] | None, allow_no_auth: bool) -> None:
    """Refuse to serve everyone on the network without a login, unless the operator said so explicitly."""
    if is_loopback(host) or login is not None or allow_no_auth:
        return
    raise ConfigError(
        f"--host {host} serves everyone who can reach this machine, and the page can load any model path and run "
        f"calibrations: give a login (--auth-file FILE or ${AUTH_ENV}=USER:PASSWORD), or --allow-no-auth if you mean it"
    )


def model_roots(host: str, roots: list[str] | None) -> list[Path] | None:
    """The folders the Model box may open: any (None) on loopback without ``--model-root``, else only these."""
    if not roots and is_loopback(host):
        return None
    out = []
    for root in roots or []:
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"--model-root {root} is not a folder")
        out.append(path)
    return out


def hub_ids_allowed(host: str, allow_hub: bool) -> bool:
    """Whether the Model box takes Hub ids: always on loopback, beyond it only when the operator said ``--allow-hub``."""
    return allow_hub or is_loopback(host)
