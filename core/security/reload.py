"""Reloading a daemon's certificates without a restart (SIGHUP, `systemctl reload`).

Every SSL context a daemon makes from its TLS files comes from one `TlsContexts`, which remembers
the files each context was made from. Listeners and connection pools keep the context object they
were given (a `ReloadingContext`); `reload()` reads the files again and makes a fresh context from
them for each, and from then on every new connection the object wraps (`wrap_bio`, what asyncio's
TLS transport and so aiohttp call; `wrap_socket`) is made from that fresh context. New handshakes
therefore present the new certificate and verify the peer against the new CA file only: a CA
removed from the file is refused from the reload on, in servers and in clients alike (OpenSSL's
certificate store of one context can only grow, hence a new context rather than loading into the
old one). Connections already open carry on with the session they negotiated; an idle keep-alive
connection in an aiohttp pool is reused until the pool closes it (`keepalive_timeout`, 15 s by
default).

Files are read once, checked, and only then loaded: the certificate must come from a CA in the CA
file, be valid now, carry the context's role, and its key must match it (a scratch context loads
them first). Anything wrong leaves every context as it was. The checked bytes are loaded from
anonymous memory files (memfd), never re-read from the paths, so a file replaced between the check
and the load cannot slip in unchecked, and no key is copied to disk.

No context is ever changed once made, so a handshake running in a worker thread is never raced.
The peer port, which hands its contexts to such threads itself, uses `renewed()`: a new context
after each reload, from the paths.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from core.security.pki import HostCertPaths, Role
from core.security.tls import TlsConfigError, TlsFiles, check_certificate, client_context, server_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Source:
    """The files a context was made from and the role its certificate must have."""

    ca_file: str
    cert_file: str
    key_file: str
    role: Role


@dataclass(frozen=True)
class _Checked:
    ca: bytes
    chain: bytes
    key: bytes
    cert: x509.Certificate


def _source(files: TlsFiles, role: Role) -> _Source:
    return _Source(os.fspath(files.ca_file), os.fspath(files.cert_file), os.fspath(files.key_file), role)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds `data`, in anonymous memory (closed on exit)."""
    fd = os.memfd_create("ferryman-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TlsConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _check(source: _Source) -> _Checked:
    """Read and check one set of files; TlsConfigError naming the file that is wrong."""
    ca = _read(source.ca_file, "CA file")
    chain = _read(source.cert_file, "certificate")
    key = _read(source.key_file, "key")
    try:
        cas = x509.load_pem_x509_certificates(ca)
    except ValueError as exc:
        raise TlsConfigError(f"{source.ca_file} holds no readable PEM certificate: {exc}") from exc
    try:
        cert = x509.load_pem_x509_certificates(chain)[0]
    except ValueError as exc:
        raise TlsConfigError(f"{source.cert_file} holds no readable PEM certificate: {exc}") from exc
    check_certificate(cas, cert, role=source.role, cert_name=source.cert_file, ca_name=source.ca_file)
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        scratch.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"OpenSSL cannot load the CA file {source.ca_file}: {exc}") from exc
    try:
        with _memory_file(chain) as chain_path, _memory_file(key) as key_path:
            scratch.load_cert_chain(certfile=chain_path, keyfile=key_path)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"{source.key_file} does not fit {source.cert_file}: {exc}") from exc
    return _Checked(ca, chain, key, cert)


class ReloadingContext(ssl.SSLContext):
    """A context whose new connections are made from the context of the latest reload.

    Until the first reload that is itself; `wrap_bio`/`wrap_socket` then hand the connection to
    the fresh context (the connection's `context` is that one), so its certificate and CA store
    are the ones verification uses.
    """

    _current: ssl.SSLContext | None = None

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        current = self._current
        if current is None:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        return current.wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        current = self._current
        if current is None:
            return super().wrap_socket(sock, *args, **kwargs)
        return current.wrap_socket(sock, *args, **kwargs)

    def switch_to(self, fresh: ssl.SSLContext) -> None:
        """New connections from now on are made from `fresh`."""
        self._current = fresh


_Make = Callable[..., ssl.SSLContext]  # server_context or client_context


class TlsContexts:
    """Makes a daemon's SSL contexts and moves all of them to their files' current contents on reload."""

    def __init__(self) -> None:
        self._made: list[tuple[ReloadingContext, _Make, _Source]] = []
        self._renewed: list[_Source] = []
        self.generation = 0
        """How many reloads succeeded: `Renewed` contexts are made again when it changes."""

    def _track(self, make: _Make, files: TlsFiles, role: Role) -> ssl.SSLContext:
        ctx = make(files, ReloadingContext)
        assert isinstance(ctx, ReloadingContext)
        self._made.append((ctx, make, _source(files, role)))
        return ctx

    def server(self, files: TlsFiles, role: Role = Role.AGENT) -> ssl.SSLContext:
        """`server_context(files)`, reloaded by `reload()`."""
        return self._track(server_context, files, role)

    def client(self, files: TlsFiles, role: Role = Role.AGENT) -> ssl.SSLContext:
        """`client_context(files)`, reloaded by `reload()`."""
        return self._track(client_context, files, role)

    def reload(self) -> dict[str, x509.Certificate]:
        """Make every context again from its files; returns the certificates now served, by file.

        All files are checked and every fresh context made before any is used: TlsConfigError
        leaves them all as they were.
        """
        checked: dict[_Source, _Checked] = {}
        for source in [s for _, _, s in self._made] + self._renewed:
            if source not in checked:
                checked[source] = _check(source)
        fresh: list[tuple[ReloadingContext, ssl.SSLContext]] = []
        for ctx, make, source in self._made:
            files = checked[source]
            with (
                _memory_file(files.ca) as ca_path,
                _memory_file(files.chain) as chain_path,
                _memory_file(files.key) as key_path,
            ):
                new = make(HostCertPaths(Path(ca_path), Path(chain_path), Path(key_path)))
            # Settings a caller changed after making the context (the coordinator's listener takes
            # connections without a certificate) hold for the fresh one too.
            new.check_hostname = ctx.check_hostname
            new.verify_mode = ctx.verify_mode
            fresh.append((ctx, new))
        for ctx, new in fresh:
            ctx.switch_to(new)
        self.generation += 1
        return {source.cert_file: files.cert for source, files in checked.items()}

    def renewed(self, files: TlsFiles, make: Callable[[], ssl.SSLContext], role: Role = Role.AGENT) -> Renewed:
        """A context made by `make` from `files` (e.g. `client_context(files)`), made again after each
        reload; a reload checks `files` first like those of every other context."""
        self._renewed.append(_source(files, role))
        return Renewed(self, make)

    def reload_logged(self) -> bool:
        """`reload()` for a signal handler: says in the log what it loaded, or why it kept the old files."""
        if not self._made and not self._renewed:
            log.info("tls reload: no TLS contexts to reload")
            return True
        try:
            loaded = self.reload()
        except TlsConfigError as exc:
            log.error(f"tls reload refused, keeping the current certificates: {exc.message}", extra={"code": exc.code})
            return False
        for path, cert in loaded.items():
            log.info(
                "tls certificates reloaded",
                extra={
                    "cert_file": path,
                    "serial": f"{cert.serial_number:x}",
                    "not_after": cert.not_valid_after_utc.isoformat(),
                    "contexts": sum(1 for s in [s for _, _, s in self._made] + self._renewed if s.cert_file == path),
                },
            )
        return True


class Renewed:
    """A context for connections wrapped in worker threads: replaced after a reload, never changed.

    `get()` (on the event loop) returns the current one; a handshake already running in a thread
    keeps the context it started with.
    """

    def __init__(self, contexts: TlsContexts, make: Callable[[], ssl.SSLContext]) -> None:
        self._contexts = contexts
        self._make = make
        self._ctx: ssl.SSLContext | None = None
        self._generation = -1

    def get(self) -> ssl.SSLContext:
        if self._ctx is None:
            self._ctx, self._generation = self._make(), self._contexts.generation
        elif self._generation != self._contexts.generation:
            self._generation = self._contexts.generation
            try:
                self._ctx = self._make()
            except TlsConfigError as exc:
                # The files changed again after the reload checked them: keep what works.
                log.error(f"tls renewal failed, keeping the current certificates: {exc.message}")
        return self._ctx
