"""CURVE authentication and encryption for TCP control sockets (ZeroMQ's CurveZMQ).

An unauthenticated control plane must not leave the machine, so the server refuses remote TCP
binds unless it has CURVE keys: its own key pair and a folder of the public keys of the clients
it lets in (one ``*.key`` file each). Keys are ZeroMQ certificate files as ``zmq.auth`` writes
them (``NAME.key``: public; ``NAME.key_secret``: public + secret); ``python -m runtime keys DIR
--name NAME`` makes a pair. A client needs its own secret file and the server's public file.

With keys, every TCP socket of the server (requests and events) runs CURVE, and a ZAP handler
(``zmq.auth.thread.ThreadAuthenticator``) admits only clients whose public key is in the folder;
an unknown or missing key gets no connection at all (the handshake fails, nothing is answered).
ipc sockets stay as they are: the file's permissions guard them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from runtime.config import ControlConfig

__all__ = ["ClientKeys", "CurveError", "ServerKeys", "make_key_pair"]


class CurveError(ValueError):
    """A key file or folder that cannot be used, named in the message."""


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise CurveError(f"CURVE key file {path} does not exist")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as err:
        raise CurveError(f"{path} is not a ZeroMQ certificate file: {err}") from None
    if secret and secret_key is None:
        raise CurveError(f"{path} holds no secret key (give the NAME.key_secret file)")
    return public, secret_key


@dataclass(frozen=True)
class ServerKeys:
    """The server's key pair (``secret_file``: NAME.key_secret) and the folder of authorised clients'
    public keys (``authorized_dir``: one NAME.key per client)."""

    secret_file: Path
    authorized_dir: Path

    @classmethod
    def from_config(cls, control: ControlConfig) -> ServerKeys | None:
        """The ``[control]`` section's keys, or None when CURVE is off."""
        if not control.curve_secret_key:
            return None
        return cls(Path(control.curve_secret_key), Path(control.curve_authorized_keys))

    def check(self) -> None:
        """Raise :class:`CurveError` naming what is wrong; the daemon checks before binding."""
        _load(self.secret_file, secret=True)
        if not self.authorized_dir.is_dir():
            raise CurveError(f"authorised client keys folder {self.authorized_dir} does not exist")
        if not any(p.suffix == ".key" for p in self.authorized_dir.iterdir()):
            raise CurveError(f"{self.authorized_dir} holds no client public key (*.key): nobody could connect")

    def start_authenticator(self, context: zmq.Context[zmq.Socket[bytes]]) -> ThreadAuthenticator:
        """A ZAP handler on ``context`` admitting the folder's keys (re-read by ``configure_curve``)."""
        auth = ThreadAuthenticator(context)
        auth.start()
        auth.configure_curve(domain="*", location=os.fspath(self.authorized_dir))
        return auth

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        public, secret = _load(self.secret_file, secret=True)
        assert secret is not None
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True


@dataclass(frozen=True)
class ClientKeys:
    """A client's key pair (``secret_file``: NAME.key_secret) and the server's public key file."""

    secret_file: Path
    server_public_file: Path

    def check(self) -> None:
        """Raise :class:`CurveError` naming a missing or unusable key file."""
        _load(self.secret_file, secret=True)
        _load(self.server_public_file, secret=False)

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        public, secret = _load(self.secret_file, secret=True)
        assert secret is not None
        server_public, _ = _load(self.server_public_file, secret=False)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_serverkey = server_public


def make_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """Write ``folder/NAME.key`` (public) and ``folder/NAME.key_secret`` (mode 0600); refuse to
    overwrite an existing pair (a replaced server key locks every client out)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise CurveError(f"key name {name!r} must be letters, digits, '-', '_' or '.'")
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise CurveError(f"{p} exists; remove it first to make a new key pair")
    folder.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        pub_file, sec_file = zmq.auth.create_certificates(os.fspath(folder), name)
    finally:
        os.umask(old)
    return Path(pub_file), Path(sec_file)
