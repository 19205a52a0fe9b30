"""HTTPS on the ``listen_tls`` listener: the server's ``ssl.SSLContext`` from PEM files.

The context outlives a reload: ``load_cert_chain`` again on the same context replaces the
certificate for connections accepted from then on (each new connection's ``SSL`` object copies
the context's certificate when it is created; open connections keep theirs)."""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context with the standard library's defaults (TLS 1.2 or later, its ciphers),
    serving the chain in ``cert_file`` (leaf first) with the key in ``key_file``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # The gateway speaks HTTP/1.1 only; saying so lets ALPN clients not offer h2 in vain.
    context.set_alpn_protocols(["http/1.1"])
    load_chain(context, cert_file, key_file)
    return context


def load_chain(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Serve ``cert_file`` with ``key_file`` from now on. An encrypted key fails (never
    OpenSSL's password prompt on the terminal)."""
    context.load_cert_chain(cert_file, key_file, password=_no_password)


def _no_password() -> bytes:
    return b""
