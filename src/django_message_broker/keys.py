"""CURVE keys: creating certificate files and reading them back.

Certificates are ZeroMQ's own format (``zmq.auth``): ``NAME.key`` holds the
public key and may be handed to anyone; ``NAME.key_secret`` holds both keys
and must stay with its owner (mode 0600). The broker's public certificate is
what a client needs to connect (``server_key``); a client's public
certificate goes into the broker's authorized-keys directory.

Pure file handling, no sockets: the client core and the broker server call
``client_curve`` / ``server_curve`` and set the socket options themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import zmq
import zmq.auth
import zmq.utils.z85

__all__ = ["client_curve", "create_keypair", "load_public_key", "load_secret_key", "server_curve"]

PathLike = Union[str, "os.PathLike[str]"]
_Z85_KEY_LENGTH = 40


def create_keypair(name: str, directory: PathLike = ".", *, force: bool = False) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (secret,
    0600) in ``directory``; return their paths. Refuses (``FileExistsError``)
    to overwrite either file unless ``force``."""
    if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
        raise ValueError(f"a key name must be a plain file name, not {name!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [str(path) for path in (public, secret) if path.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    for path in (public, secret):
        if path.exists():
            path.unlink()
    # The secret file must never exist with a wider mode, even for a moment:
    # create both under a strict umask, then open up the public one.
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load_public_key(value: Union[str, bytes, PathLike]) -> bytes:
    """A public key as Z85 bytes, from a certificate file (public or secret)
    or from the 40-character Z85 text itself."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = os.fspath(value)
    if len(text) == _Z85_KEY_LENGTH and not os.path.exists(text):
        try:
            if len(zmq.utils.z85.decode(text)) == 32:
                return text.encode("ascii")
        except (ValueError, KeyError, IndexError, UnicodeEncodeError):
            pass
        raise ValueError(f"{text!r} is neither a certificate file nor a Z85 public key")
    public, _ = _load(text)
    return public


def load_secret_key(path: PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` from a secret certificate file."""
    public, secret = _load(os.fspath(path))
    if not secret:
        raise ValueError(f"{os.fspath(path)} holds no secret key (a .key_secret file is needed, not a .key)")
    return public, secret


def _load(path: str) -> tuple[bytes, Optional[bytes]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no certificate file at {path}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a ZeroMQ certificate: {exc}") from None
    if not public:
        raise ValueError(f"{path} is not a ZeroMQ certificate: no public key")
    return public, secret


def client_curve(
    server_key: Union[str, bytes, PathLike, None], client_key: Optional[PathLike]
) -> Optional[tuple[bytes, bytes, bytes]]:
    """``(server public, client public, client secret)`` for a client, or
    None for plain text. Without ``client_key`` the client makes a throwaway
    key pair: the connection is encrypted, and only a broker that checks no
    allow-list accepts it."""
    if server_key is None or server_key == "":
        if client_key:
            raise ValueError("client_key needs server_key (the broker's public certificate)")
        return None
    server_public = load_public_key(server_key)
    if client_key:
        public, secret = load_secret_key(client_key)
    else:
        public, secret = zmq.curve_keypair()
    return server_public, public, secret


def server_curve(secret_key: Optional[PathLike]) -> Optional[tuple[bytes, bytes]]:
    """``(public, secret)`` of the broker, or None for plain text."""
    if secret_key is None or secret_key == "":
        return None
    return load_secret_key(secret_key)
