"""The daemon's side of the control plane: a ROUTER socket for requests, a PUB socket for events.

The supervisor owns one :class:`ControlServer` and calls :meth:`ControlServer.poll`
from its main loop (or registers :attr:`ControlServer.command_socket` in its own
``zmq.Poller`` and calls :meth:`ControlServer.handle_pending`). Requests are
answered synchronously by a handler ``handler(params) -> result`` (the
validated params model in, the command's result model out); handlers must
be quick (start work, don't do it), because while one runs no other request
is read.

ZeroMQ sockets are not thread-safe: create, poll, publish and close from one
thread.

Why ROUTER and not REP: REP answers strictly in turn and wedges if a client
vanishes mid-request; ROUTER lets us reply to whoever asked, accept both REQ
clients (envelope ``identity, "", payload``) and DEALER clients (with or
without the empty delimiter), and drop replies for clients that have gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import zmq
from pydantic import BaseModel

from runtime.control.curve import ServerKeys
from runtime.control.events import Event, EventPayload
from runtime.control.protocol import (
    MAX_REQUEST_BYTES,
    NON_IDEMPOTENT,
    ProtocolError,
    Request,
    RequestError,
    RequestId,
    RequestParams,
    encode_error,
    encode_event,
    encode_reply,
    parse_request,
    request_id_of,
)
from runtime.control.replies import RESULTS
from runtime.errors import describe

log = logging.getLogger(__name__)

Handler = Callable[[RequestParams], BaseModel | Mapping[str, object]]
"""``handler(params) -> result``: the params model says which command it is (match on its type);
the result is the command's model from :mod:`runtime.control.replies` (a plain mapping is sent as
it is, unchecked: for test doubles)."""

# Bounds on what one client message may hold. libzmq enforces the frame size
# (ZMQ_MAXMSGSIZE: a bigger frame disconnects the peer before we see it); the
# frame count and the total are ours, checked as the frames are read.
MAX_FRAME_BYTES: Final = 2 * MAX_REQUEST_BYTES
"""Largest frame libzmq accepts; between MAX_REQUEST_BYTES and this the client gets a clear error."""
MAX_FRAMES: Final = 8
"""Frames in one message: the identity ROUTER adds, envelope frames, a delimiter, the payload."""
MAX_MESSAGE_BYTES: Final = MAX_FRAME_BYTES + 4096
"""All frames of one message together (the payload plus routing identities of up to 255 bytes)."""
# libzmq hands over a multipart message only once all of it has arrived: a
# message of a million empty frames is read (and dropped) in slices of this
# many frames per call, so the main loop keeps beating the watchdog meanwhile.
_DISCARD_PER_CALL: Final = 20_000
# After dropping a message at least this big (or of at least _DISCARD_PER_CALL
# frames), give the freed heap back to the OS.
_TRIM_AFTER_BYTES: Final = 1 << 20
# sockaddr_un.sun_path is 108 bytes including the terminating NUL on Linux.
_MAX_IPC_PATH: Final = 107
_MAX_BATCH: Final = 256
COMMAND_RCVHWM: Final = 16
"""Requests libzmq queues per client before it stops reading that client's connection.

A client waits for each reply, so it never has more than a few in flight; libzmq's default
(1000) let a flooding client park up to 1000 many-frame messages in the daemon's own memory
(measured: 4 sockets of 1500-frame messages took the daemon from 111 MiB to 1 GiB). At 16 the
backlog stays in the sender's queue and the kernel's socket buffers instead."""


def _release_freed_memory() -> None:
    """Return freed heap to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    libzmq buffers a whole multipart message in its I/O thread before we can see any of it;
    after a hostile 100 MB message is dropped, glibc would otherwise keep the pages mapped and
    the daemon's RSS would stay at its peak.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class _Oversized:
    """A message being dropped because it broke a bound; answered once its last frame is read."""

    envelope: list[bytes]
    reason: str
    frames: int
    nbytes: int


@dataclass
class ServerCounters:
    """What the server has seen since it started (for ``status``, logs and the fuzz bench)."""

    messages: int = 0  # read off the socket, whole or not
    replies: int = 0  # sent back, errors included
    errors: int = 0  # error replies
    dropped: int = 0  # messages broken beyond answering, or that broke a bound


def _ipc_path(endpoint: str) -> Path | None:
    if not endpoint.startswith("ipc://"):
        return None
    rest = endpoint[len("ipc://") :]
    if rest.startswith("@") or rest == "*":  # abstract namespace / wildcard: no file
        return None
    return Path(rest)


def _check_bindable(endpoint: str, authenticated: bool = False) -> None:
    """Refuse binds that would be unsafe or fail obscurely.

    - Remote TCP binds would expose an unauthenticated control plane: only
      loopback is allowed unless the server has CURVE keys (``authenticated``).
    - libzmq *unlinks* an existing ipc socket file on bind, so a second daemon
      would silently steal the endpoint from a running one. If something
      answers on the file, refuse; if nothing does, it is a stale leftover of
      a crash and binding over it is right.
    """
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
        if host not in {"127.0.0.1", "localhost", "[::1]", "::1"} and not authenticated:
            raise ValueError(
                f"refusing to bind {endpoint}: remote binds need CURVE keys ([control] curve_secret_key and "
                "curve_authorized_keys; python -m runtime keys makes them); use ipc:// or tcp://127.0.0.1"
            )
        return
    path = _ipc_path(endpoint)
    if path is None:
        return
    if len(os.fsencode(path)) > _MAX_IPC_PATH:
        raise ValueError(
            f"ipc path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow at most {_MAX_IPC_PATH}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ValueError(f"refusing to bind {endpoint}: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except OSError as err:
            if err.errno not in (errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOENT):
                raise
            log.info("removing stale socket %s left by an earlier run", path)
        else:
            raise RuntimeError(f"{endpoint} is already served by another process (is the daemon running?)")
        finally:
            probe.close()


class _ReplyCache:
    """Replies to recent non-idempotent requests, so a retried request is answered, not re-run."""

    def __init__(self, ttl_s: float, max_entries: int = 256) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()

    def get(self, payload: bytes) -> bytes | None:
        self._expire()
        hit = self._entries.get(payload)
        return None if hit is None else hit[1]

    def put(self, payload: bytes, reply: bytes) -> None:
        if self._ttl_s <= 0:
            return
        self._entries[payload] = (time.monotonic() + self._ttl_s, reply)
        self._entries.move_to_end(payload)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._entries:
            key, (deadline, _) = next(iter(self._entries.items()))
            if deadline > now:
                break
            del self._entries[key]


class ControlServer:
    """ROUTER (requests) + PUB (events) sockets serving a command handler.

    ``handler(params)`` gets the validated params model of the request
    (:data:`~runtime.control.protocol.RequestParams`: its type is the command)
    and returns the command's result model (:data:`~runtime.control.replies.RESULTS`;
    a model of another type is answered with an "internal" error). It raises
    :class:`~runtime.control.protocol.RequestError` for expected refusals
    ("busy", "not_running", "invalid_params"); any other exception is logged
    and answered with an "internal" error, and the server keeps serving.
    """

    def __init__(
        self,
        command_endpoint: str,
        event_endpoint: str,
        handler: Handler,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        dedup_s: float = 30.0,
        socket_mode: int | None = 0o660,
        curve: ServerKeys | None = None,
    ) -> None:
        """Bind both sockets.

        ``dedup_s``: how long a reply to a non-idempotent request with a string
        id is kept to answer a retry (0 disables). ``socket_mode``: permissions
        given to ipc socket files (0o660: the service's group may connect, as
        the scanner UI does; None leaves the umask's choice). ``curve``: CURVE
        keys; every TCP socket then authenticates and encrypts, and TCP may bind
        beyond loopback (:mod:`runtime.control.curve`).
        """
        self._handler = handler
        # Our own context by default, so close() can term() it: that waits
        # until libzmq's I/O thread has really closed the listeners, and a
        # new server (a restart in the same process, the next test) can bind
        # the same ipc path at once instead of finding it still answering.
        self._own_ctx = context is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context() if context is None else context
        self._cache = _ReplyCache(dedup_s)
        self._seq = 0
        self._closed = False
        self._oversized: _Oversized | None = None
        # Frames and bytes of dropped messages since the freed heap was last given back.
        self._discarded_frames = 0
        self._discarded_bytes = 0
        self.counters = ServerCounters()
        self.command_endpoint = command_endpoint
        self.event_endpoint = event_endpoint
        self._sockets: list[tuple[zmq.Socket[bytes], str]] = []
        self._curve = curve
        self._auth = None
        try:
            if curve is not None:
                curve.check()
                self._auth = curve.start_authenticator(self._ctx)
            self._router = self._bind(zmq.ROUTER, command_endpoint, socket_mode)
            self._pub = self._bind(zmq.PUB, event_endpoint, socket_mode)
        except BaseException:
            self._release()
            raise
        # The endpoints as bound: a wildcard (tcp://127.0.0.1:*) becomes the real port.
        self.command_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.event_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self._router, zmq.POLLIN)
        log.info("control: requests on %s, events on %s", command_endpoint, event_endpoint)

    def _bind(self, kind: int, endpoint: str, mode: int | None) -> zmq.Socket[bytes]:
        _check_bindable(endpoint, authenticated=self._curve is not None)
        sock: zmq.Socket[bytes] = self._ctx.socket(kind)
        if self._curve is not None and endpoint.startswith("tcp://"):
            self._curve.apply(sock)
        # LINGER 0: on close, undelivered replies/events are dropped instead of
        # holding the process (and systemd's stop timeout) hostage.
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if kind == zmq.ROUTER:  # (before bind: the listener copies the options it accepts with)
            sock.setsockopt(zmq.RCVHWM, COMMAND_RCVHWM)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as err:
            sock.close(linger=0)
            raise OSError(err.errno, f"cannot bind {endpoint}: {err.strerror}") from None
        self._sockets.append((sock, endpoint))
        path = _ipc_path(endpoint)
        if path is not None and mode is not None:
            os.chmod(path, mode)
        return sock

    # ------------------------------------------------------------------ sockets

    @property
    def command_socket(self) -> zmq.Socket[bytes]:
        """The ROUTER socket, to register in a caller's own ``zmq.Poller``."""
        return self._router

    @property
    def event_socket(self) -> zmq.Socket[bytes]:
        return self._pub

    def fileno(self) -> int:
        """The ROUTER's ZMQ_FD (edge-triggered: after it fires, call handle_pending until it returns 0)."""
        return int(self._router.getsockopt(zmq.FD))

    # ------------------------------------------------------------------ requests

    def poll(self, timeout_ms: int, wake: Sequence[int] = ()) -> int:
        """Wait up to ``timeout_ms`` for requests, answer all pending ones; return how many.

        ``wake``: file descriptors that end the wait early once readable (the supervisor's worker events,
        while a job starts or finishes); the caller reads them, this only stops waiting."""
        if self._closed:
            raise RuntimeError("ControlServer is closed")
        poller = self._poller
        if wake:
            poller = zmq.Poller()
            poller.register(self._router, zmq.POLLIN)
            for fd in wake:
                poller.register(fd, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        if self._router not in ready:
            return 0
        return self.handle_pending()

    def handle_pending(self) -> int:
        """Answer every request already queued, without waiting; return how many were read.

        Bounded per call so a flood of requests cannot starve the caller's loop
        (watchdog pings, worker supervision). Nothing a client sends escapes
        from here: a failure while reading or answering one message is logged
        and that message dropped.
        """
        handled = 0
        while handled < _MAX_BATCH:
            if self._oversized is not None and not self._discard_rest():
                break  # more of the oversized message next call
            try:
                frames = self._recv_message()
            except zmq.Again:
                break
            except zmq.ZMQError as err:  # EINTR and friends: try again on the next poll
                log.warning("control: receive failed: %s", err)
                break
            handled += 1
            self.counters.messages += 1
            if frames is None:
                continue  # oversized: answered once its last frame is read
            try:
                self._serve(frames)
            except Exception:
                self.counters.dropped += 1
                log.exception("control: dropped a request that could not be answered")
        return handled

    def _recv_message(self) -> list[bytes] | None:
        """Read one message, frame by frame, keeping at most MAX_FRAMES / MAX_MESSAGE_BYTES.

        Returns the frames, or None when the message broke a bound (the rest of it is then
        discarded by :meth:`_discard_rest` and the client told which bound).
        """
        first = self._router.recv(zmq.NOBLOCK)
        frames = [first]
        nbytes = len(first)
        while self._router.getsockopt(zmq.RCVMORE):
            if len(frames) >= MAX_FRAMES:
                reason = f"message has more than {MAX_FRAMES} frames; the limit is {MAX_FRAMES}"
            elif nbytes > MAX_MESSAGE_BYTES:
                reason = f"message is more than {MAX_MESSAGE_BYTES} bytes; the limit is {MAX_MESSAGE_BYTES}"
            else:
                frame = self._router.recv(zmq.NOBLOCK)
                frames.append(frame)
                nbytes += len(frame)
                continue
            self._oversized = _Oversized(self._reply_envelope(frames), reason, len(frames), nbytes)
            self._discard_rest()
            return None
        if nbytes > MAX_MESSAGE_BYTES:
            reason = f"message is {nbytes} bytes; the limit is {MAX_MESSAGE_BYTES}"
            self._oversized = _Oversized(self._reply_envelope(frames), reason, len(frames), nbytes)
            self._discard_rest()
            return None
        return frames

    @staticmethod
    def _reply_envelope(frames: list[bytes]) -> list[bytes]:
        # The identity, and the delimiter when the client sent one right after it (REQ).
        return frames[:2] if len(frames) > 1 and frames[1] == b"" else frames[:1]

    def _discard_rest(self) -> bool:
        """Read and drop up to _DISCARD_PER_CALL more frames of the oversized message.

        Returns True once its last frame is gone (and the client has its error reply).
        """
        big = self._oversized
        assert big is not None
        for _ in range(_DISCARD_PER_CALL):
            if not self._router.getsockopt(zmq.RCVMORE):
                break
            frame = self._router.recv(zmq.NOBLOCK, copy=False)
            big.frames += 1
            big.nbytes += len(frame)
        else:
            return False
        self._oversized = None
        self.counters.dropped += 1
        log.warning("control: dropped a message of %d frames, %d bytes: %s", big.frames, big.nbytes, big.reason)
        self._send(big.envelope, self._error(None, "malformed", big.reason))
        # Many middling messages free as much as one big one: count them together.
        self._discarded_frames += big.frames
        self._discarded_bytes += big.nbytes
        if self._discarded_bytes >= _TRIM_AFTER_BYTES or self._discarded_frames >= _DISCARD_PER_CALL:
            _release_freed_memory()  # libzmq: ~64 B per frame
            self._discarded_frames = self._discarded_bytes = 0
        return True

    def _serve(self, frames: list[bytes]) -> None:
        # Envelope: the identity ROUTER prepended, then (REQ, or a polite
        # DEALER) an empty delimiter. The reply goes back with the same envelope.
        delimiter = next((i for i in range(1, len(frames)) if frames[i] == b""), None)
        split = delimiter + 1 if delimiter is not None else 1
        envelope, body = frames[:split], frames[split:]
        if len(body) != 1:
            self._send(envelope, self._error(None, "malformed", f"expected 1 payload frame, got {len(body)}"))
            return
        self._send(envelope, self._answer(body[0]))

    def _answer(self, payload: bytes) -> bytes:
        try:
            request = parse_request(payload)
        except ProtocolError as err:
            log.info("control: rejected request (%s): %s", err.code, err.message)
            return self._error(err.request_id, err.code, err.message)
        dedup = request.command in NON_IDEMPOTENT and isinstance(request.id, str)
        if dedup:
            cached = self._cache.get(payload)
            if cached is not None:
                log.info("control: repeated %s id=%r answered from cache", request.command, request.id)
                return cached
        reply = self._call(request)
        if dedup:
            self._cache.put(payload, reply)
        return reply

    def _call(self, request: Request) -> bytes:
        request_id, command = request.id, request.command
        log.debug("control: %s id=%r params=%r", command, request_id, request.params)
        try:
            result = self._handler(request.params)
            expected = RESULTS[command]
            if not isinstance(result, expected if isinstance(result, BaseModel) else Mapping):
                what = f"{type(result).__name__} for {command!r}, expected {expected.__name__} or a dict"
                raise TypeError(f"handler returned {what}")
            return encode_reply(request_id, result)
        except RequestError as err:
            log.info("control: %s id=%r refused (%s): %s", command, request_id, err.code, err.message)
            return self._error(request_id, err.code, err.message)
        except Exception as err:
            # The control plane must outlive a buggy handler: report, keep serving.
            # The traceback goes to the log, never to the client.
            log.exception("control: handler failed on %s id=%r", command, request_id)
            return self._error(request_id, "internal", f"{command} failed: {describe(err)}")

    def _error(self, request_id: RequestId | None, code: str, message: str) -> bytes:
        self.counters.errors += 1
        return encode_error(request_id, code, message)

    def _send(self, envelope: list[bytes], reply: bytes) -> None:
        self.counters.replies += 1
        try:
            self._router.send_multipart([*envelope, reply], zmq.NOBLOCK)
        except zmq.Again:
            # The client's pipe is full or it has gone; it will time out and retry.
            log.warning("control: dropped a reply for %r (peer not reading)", request_id_of(reply))
        except zmq.ZMQError as err:  # e.g. EHOSTUNREACH with ROUTER_MANDATORY: the peer has gone
            log.warning("control: could not send a reply for %r: %s", request_id_of(reply), err)

    # ------------------------------------------------------------------ events

    def publish(self, event: Event) -> int:
        """Publish a typed event (:mod:`runtime.control.events`); return its sequence number (1, 2, ...).

        Never blocks: PUB drops events for subscribers that fall behind, which
        they detect as a gap in ``seq``.
        """
        if self._closed:
            raise RuntimeError("ControlServer is closed")
        if not isinstance(event, EventPayload):
            raise TypeError(f"publish takes an event model (runtime.control.events), got {type(event).__name__}")
        name, data = event.name_and_data()
        frames = encode_event(self._seq + 1, name, data)  # checked before the number is used
        self._seq += 1
        self._pub.send_multipart(frames, zmq.NOBLOCK)
        return self._seq

    @property
    def last_seq(self) -> int:
        """Sequence number of the last published event (0 before the first); ``status`` can report it."""
        return self._seq

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close both sockets (LINGER 0) and remove their ipc files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:
        for sock, _ in self._sockets:
            sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx:
            self._ctx.term()  # returns once the listeners are really closed
        for _, endpoint in self._sockets:
            path = _ipc_path(endpoint)
            if path is not None:
                # libzmq leaves the file behind; a dead socket file misleads
                # people and tools into thinking the daemon is up.
                path.unlink(missing_ok=True)
        self._sockets.clear()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
