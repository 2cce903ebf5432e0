"""Ray's token for token authentication, made readable by its owner only.

Where a local Ray starts with token auth and finds no token, Ray writes ``~/.ray/auth_token``
itself (``ray.init()``, ``ray get-auth-token --generate``) with the umask's mode: 0644 in a 0755
directory, so any user of the machine can read it and, with it, run code on the cluster. The
token is made here first, 0600 in a directory made 0700, and Ray finds it there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Mapping, Optional

TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"  # where Ray looks first


def token_path(env: Mapping[str, str]) -> Path:
    return Path(env.get(TOKEN_PATH_ENV) or Path(os.path.expanduser("~")) / ".ray" / "auth_token")


def ensure_private(environ: Optional[Mapping[str, str]] = None) -> None:
    """A token where Ray will look for one, made if missing or empty; readable by this user only."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return
    path = token_path(env)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as f:
        os.fchmod(fd, 0o600)  # one made earlier (by Ray, or by hand) has the umask's mode
        if not f.read().strip():
            f.seek(0)
            f.truncate()
            f.write(secrets.token_hex(32))  # as Ray's own generator: 256 bits
