"""How a node checks the server's certificate: the usual CAs, a CA it is given (--ca-cert), or
one pinned certificate (--pin-sha256). The context it builds serves HTTPS and WSS alike."""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from crowdtrain.node.waiting import backoff_s, sleep_unless_stopped

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 30.0  # between attempts to fetch the certificate of an unreachable server
HOW_TO_TRUST = (
    "if the server uses a certificate from its own CA, give the node that CA with "
    "--ca-cert FILE; if it runs with --self-signed, give --pin-sha256 FINGERPRINT (the server "
    "prints it when it starts)"
)


class TlsError(RuntimeError):
    """The node will not talk to this server over TLS; the message says why and what to do."""


def normalize_pin(pin: str) -> str:
    """'ab:cd:...' or 'ABCD...' -> 64 upper-case hex digits, or ValueError."""
    digits = pin.replace(":", "").strip().upper()
    if not re.fullmatch(r"[0-9A-F]{64}", digits):
        raise ValueError(
            f"{pin!r} is not a SHA-256 fingerprint: it must be 64 hex digits, optionally in "
            "pairs separated by colons (AB:CD:...)"
        )
    return digits


def format_fingerprint(digits: str) -> str:
    """64 hex digits -> 'AB:CD:...', the way the server prints it."""
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


def pem_fingerprint(pem: str) -> str:
    """The SHA-256 of a PEM certificate's DER bytes, as 64 upper-case hex digits."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()


def client_ssl(
    server_url: str,
    ca_cert: Path | None = None,
    pin_sha256: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ssl.SSLContext | bool:
    """What CoordinatorClient passes to httpx as `verify` (and the WebSocket client as `ssl`):
    True (the usual CAs) without options, else a context that trusts only `ca_cert`, or only
    the certificate whose fingerprint is `pin_sha256`.

    A pin is checked once, against the certificate the server presents now; `should_stop`
    given, an unreachable server is waited for (until it returns True: Stopped), otherwise
    that is a TlsError."""
    if ca_cert is not None or pin_sha256 is not None:
        _check_options(server_url, ca_cert, pin_sha256)
    if pin_sha256 is not None:
        return _pinned_context(server_url, pin_sha256, should_stop)
    if ca_cert is not None:
        return _ca_context(Path(ca_cert))
    return True


def _check_options(server_url: str, ca_cert: Path | None, pin_sha256: str | None) -> None:
    flag = "--ca-cert" if ca_cert is not None else "--pin-sha256"
    if urlsplit(server_url).scheme != "https":
        raise TlsError(
            f"{flag} checks the server's TLS certificate, but {server_url} is not an https:// "
            "URL; write https://... (the server runs with --tls-cert or --self-signed), or "
            f"drop {flag}"
        )
    if ca_cert is not None and pin_sha256 is not None:
        raise TlsError("give --ca-cert or --pin-sha256, not both")


def _ca_context(ca_cert: Path) -> ssl.SSLContext:
    """The default checks (chain, host name, dates), with `ca_cert` the only trusted CA."""
    try:
        pem = ca_cert.read_text(encoding="ascii")
    except FileNotFoundError:
        raise TlsError(f"--ca-cert: the file {ca_cert} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TlsError(f"--ca-cert: cannot read {ca_cert} as a PEM file ({exc})") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise TlsError(f"--ca-cert: {ca_cert} holds no PEM certificate")
    try:
        return ssl.create_default_context(cadata=pem)
    except ssl.SSLError as exc:
        raise TlsError(f"--ca-cert: {ca_cert} holds no usable certificate ({exc})") from None


def _pinned_context(
    server_url: str, pin_sha256: str, should_stop: Callable[[], bool] | None
) -> ssl.SSLContext:
    try:
        expected = normalize_pin(pin_sha256)
    except ValueError as exc:
        raise TlsError(f"--pin-sha256: {exc}") from None
    pem = fetch_certificate(server_url, should_stop)
    actual = pem_fingerprint(pem)
    if actual != expected:
        raise TlsError(
            f"refusing to connect: the server at {server_url} presents a certificate with "
            f"SHA-256 fingerprint {format_fingerprint(actual)}, not the pinned "
            f"{format_fingerprint(expected)}. If the server made a new certificate, ask its "
            "operator for the new fingerprint (a --self-signed server prints it at start)"
        )
    return pinned_context(pem)


def pinned_context(pem: str) -> ssl.SSLContext:
    """A context whose one trust anchor is this certificate: every connection made with it is
    verified against exactly that certificate (dates and usage too), whatever the host name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the pin is the identity, not the name
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a pinned leaf is trusted as is
    context.load_verify_locations(cadata=pem)
    return context


def fetch_certificate(server_url: str, should_stop: Callable[[], bool] | None = None) -> str:
    """The PEM certificate the server presents, read without checking it (to compare with a
    pin). Waits for an unreachable server while `should_stop` is given and returns False."""
    parts = urlsplit(server_url)
    address = (parts.hostname or "", parts.port or 443)
    attempt = 0
    while True:
        try:
            return ssl.get_server_certificate(address, timeout=FETCH_TIMEOUT_S)
        except ssl.SSLError as exc:
            raise TlsError(
                f"{server_url} did not complete a TLS handshake ({exc.reason or exc}); is the "
                "server started with --tls-cert or --self-signed, or is it an http:// URL?"
            ) from None
        except OSError as exc:
            if should_stop is None:
                raise TlsError(
                    f"cannot reach {server_url} to check its certificate against the pin: {exc}"
                ) from None
            log.warning("cannot reach %s to fetch its certificate (%s); retrying", server_url, exc)
        sleep_unless_stopped(backoff_s(attempt, MAX_BACKOFF_S), should_stop)
        attempt += 1


def certificate_error(error: BaseException, server_url: str) -> TlsError | None:
    """A TlsError saying what to do, when `error` (an httpx transport error) comes from a TLS
    problem that retrying cannot fix: the certificate failed verification, or the server does
    not speak TLS. None for anything else (a refused connection, a timeout, ...)."""
    cause: BaseException | None = error
    seen = 0
    while cause is not None and seen < 10:  # httpx -> httpcore -> ssl
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or str(cause)
            return TlsError(
                f"refusing to connect: the TLS certificate of {server_url} failed verification "
                f"({reason}); {HOW_TO_TRUST}. If you gave one, the server's certificate no "
                "longer matches it"
            )
        if isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER":
            return TlsError(
                f"{server_url} does not speak TLS on that port: use an http:// URL, or start "
                "the server with --tls-cert/--tls-key or --self-signed"
            )
        wrapped = cause.args[0] if cause.args else None  # httpcore keeps the ssl error here
        cause = cause.__cause__ or cause.__context__ or _as_error(wrapped)
        seen += 1
    return None


def _as_error(value: object) -> BaseException | None:
    return value if isinstance(value, BaseException) else None
