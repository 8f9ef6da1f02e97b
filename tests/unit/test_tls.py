"""Unit tests for TLS: the server's development certificate and certificate checks, and how a
node trusts a server (--ca-cert, --pin-sha256) and refuses anything else."""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from crowdtrain.node.client import CoordinatorClient, Stopped
from crowdtrain.node.credentials import NodeLogin
from crowdtrain.node.tls import (
    TlsError,
    certificate_error,
    client_ssl,
    format_fingerprint,
    normalize_pin,
    pem_fingerprint,
)
from crowdtrain.server import tls as server_tls
from crowdtrain.server.tls import (
    certificate_names,
    development_certificate,
    development_files,
    fingerprint_sha256,
    subject_names,
    uvicorn_tls_options,
)
from crowdtrain.settings import NodeSettings, ServerSettings, SettingsError

FINGERPRINT = re.compile(r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith("CROWDTRAIN_"):
            monkeypatch.delenv(key)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ---- the development certificate ----------------------------------------------------------


def test_development_certificate_names_this_machine_and_is_its_own_ca(tmp_path):
    files = development_certificate(tmp_path, "10.1.2.3")
    cert = load(files.cert)
    names = subject_names(cert)
    for name in ("localhost", "127.0.0.1", "::1", socket.gethostname().lower(), "10.1.2.3"):
        assert name in names
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=360) < lifetime < datetime.timedelta(days=370)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.digital_signature
    assert cert.issuer == cert.subject


def test_a_wildcard_bind_address_is_not_a_certificate_name(tmp_path):
    assert "0.0.0.0" not in certificate_names("0.0.0.0")
    assert "::" not in certificate_names("::")
    assert "trainer.example.org" in certificate_names("trainer.example.org")


def test_the_key_is_owner_only(tmp_path):
    files = development_certificate(tmp_path, "127.0.0.1")
    assert files.key.stat().st_mode & 0o777 == 0o600
    assert files.cert.parent.stat().st_mode & 0o777 == 0o700
    assert files == development_files(tmp_path)
    assert files.cert.parent == tmp_path / "tls"


def test_the_certificate_is_reused_while_valid_for_the_host(tmp_path):
    first = fingerprint_sha256(development_certificate(tmp_path, "127.0.0.1").cert.read_bytes())
    again = fingerprint_sha256(development_certificate(tmp_path, "127.0.0.1").cert.read_bytes())
    assert again == first
    # a new bind address the old certificate does not name: a new certificate
    moved = fingerprint_sha256(development_certificate(tmp_path, "10.9.9.9").cert.read_bytes())
    assert moved != first


def test_a_certificate_close_to_expiry_is_replaced(tmp_path, monkeypatch):
    first = development_certificate(tmp_path, "127.0.0.1").cert.read_bytes()
    monkeypatch.setattr(server_tls, "RENEW_WITHIN", datetime.timedelta(days=400))
    second = development_certificate(tmp_path, "127.0.0.1").cert.read_bytes()
    assert second != first


def test_a_damaged_certificate_is_replaced(tmp_path):
    files = development_certificate(tmp_path, "127.0.0.1")
    files.key.write_text("garbage")
    development_certificate(tmp_path, "127.0.0.1")
    check = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    check.load_cert_chain(files.cert, files.key)  # a matching pair again


def test_the_fingerprint_is_the_sha256_of_the_der_certificate(tmp_path):
    pem = development_certificate(tmp_path, "127.0.0.1").cert.read_text()
    fingerprint = fingerprint_sha256(pem)
    assert FINGERPRINT.match(fingerprint)
    assert fingerprint.replace(":", "") == pem_fingerprint(pem)
    # what the node's settings accept, as printed
    assert NodeSettings(pin_sha256=fingerprint).pin_sha256 == fingerprint


# ---- a given certificate and key ----------------------------------------------------------


@pytest.fixture(scope="module")
def authority():
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(authority):
    return authority.issue_cert("127.0.0.1", "localhost")


@pytest.fixture
def pair(tmp_path, leaf):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def tls_settings(cert, key, tmp_path) -> ServerSettings:
    return ServerSettings(tls_cert=cert, tls_key=key, data_dir=tmp_path / "data")


def test_tls_options_for_uvicorn(tmp_path, pair):
    cert, key = pair
    assert uvicorn_tls_options(ServerSettings(data_dir=tmp_path)) == {}
    options = uvicorn_tls_options(tls_settings(cert, key, tmp_path))
    assert options == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    made = uvicorn_tls_options(ServerSettings(self_signed=True, data_dir=tmp_path / "d"))
    assert Path(made["ssl_certfile"]) == tmp_path / "d" / "tls" / "cert.pem"


def test_a_missing_certificate_or_key_is_named(tmp_path, pair):
    cert, key = pair
    with pytest.raises(SettingsError, match=r"tls_cert: the file .*nope.pem does not exist"):
        uvicorn_tls_options(tls_settings(tmp_path / "nope.pem", key, tmp_path))
    with pytest.raises(SettingsError, match=r"tls_key: the file .*gone.pem does not exist"):
        uvicorn_tls_options(tls_settings(cert, tmp_path / "gone.pem", tmp_path))
    with pytest.raises(SettingsError, match="is a directory"):
        uvicorn_tls_options(tls_settings(tmp_path, key, tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_is_named(tmp_path, pair):
    cert, key = pair
    key.chmod(0)
    with pytest.raises(SettingsError, match="permission denied"):
        uvicorn_tls_options(tls_settings(cert, key, tmp_path))


def test_files_that_are_not_pem_are_named(tmp_path, pair):
    cert, key = pair
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(SettingsError, match="holds no PEM certificate"):
        uvicorn_tls_options(tls_settings(junk, key, tmp_path))
    with pytest.raises(SettingsError, match="holds no PEM private key"):
        uvicorn_tls_options(tls_settings(cert, junk, tmp_path))
    # the two swapped
    with pytest.raises(SettingsError, match="holds no PEM"):
        uvicorn_tls_options(tls_settings(key, cert, tmp_path))


def test_a_key_of_another_certificate_is_refused(tmp_path, pair, authority):
    cert, _ = pair
    other = tmp_path / "other-key.pem"
    authority.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
    with pytest.raises(SettingsError, match="is not the private key of the certificate"):
        uvicorn_tls_options(tls_settings(cert, other, tmp_path))


def test_a_password_protected_key_is_refused_with_the_fix(tmp_path, pair):
    cert, key = pair
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(SettingsError, match="protected by a password.*openssl pkey"):
        uvicorn_tls_options(tls_settings(cert, locked, tmp_path))


def test_server_cli_prints_the_fingerprint_and_the_join_command(tmp_path):
    """--self-signed: the https URL, the fingerprint and a node command line with the pin."""
    import crowdtrain.server.app as server_app
    from crowdtrain.cli import app

    runtime = SimpleNamespace(
        resumed_from=None,
        manifest=SimpleNamespace(numel=10),
        train_data=SimpleNamespace(dataset="d", split="train", tokens=1, shards=[1]),
        security=SimpleNamespace(new_admin_token="ct_admin_" + "x" * 43),
    )

    def fake_run_server(settings, on_ready, on_admin_token):
        uvicorn_tls_options(settings)
        on_admin_token(runtime.security.new_admin_token)  # as ServerRuntime calls it
        on_ready(runtime, "https://0.0.0.0:8443")

    with mock.patch.object(server_app, "run_server", fake_run_server):
        result = CliRunner().invoke(
            app, ["server", "--self-signed", "--data-dir", str(tmp_path), "--host", "0.0.0.0"]
        )
    assert result.exit_code == 0, result.output
    fingerprint = fingerprint_sha256((tmp_path / "tls" / "cert.pem").read_bytes())
    assert f"SHA-256 fingerprint {fingerprint}" in result.output
    host = socket.gethostname()
    assert (
        f"join with: crowdtrain node --server https://{host}:8443 --pin-sha256 {fingerprint}"
        " --token ct_enroll_..." in result.output
    )
    # a new data directory: the admin token made now is shown once, with what to do next
    assert (
        "admin token (shown only now; store it, e.g. as CROWDTRAIN_ADMIN_TOKEN): "
        f"ct_admin_{'x' * 43}" in result.output
    )
    assert (
        "crowdtrain tokens create --role node --uses 10 --expires 7d "
        f"--server https://0.0.0.0:8443 --pin-sha256 {fingerprint}" in result.output
    )


# ---- the node: pins and contexts ----------------------------------------------------------


def test_a_pin_is_accepted_with_or_without_colons_in_any_case():
    digits = "AB" * 32
    assert normalize_pin(digits) == digits
    assert normalize_pin(digits.lower()) == digits
    assert normalize_pin(format_fingerprint(digits)) == digits
    assert normalize_pin(format_fingerprint(digits).lower()) == digits
    for bad in ("AB" * 31, "AB" * 33, "XY" * 32, ""):
        with pytest.raises(ValueError, match="64 hex digits"):
            normalize_pin(bad)


def test_no_option_means_the_usual_cas():
    assert client_ssl("https://example.org") is True
    assert client_ssl("http://127.0.0.1:8000") is True


def test_options_that_need_https_refuse_an_http_url(tmp_path):
    with pytest.raises(TlsError, match="--ca-cert .* not an https:// URL"):
        client_ssl("http://127.0.0.1:8000", ca_cert=tmp_path / "ca.pem")
    with pytest.raises(TlsError, match="--pin-sha256 .* not an https:// URL"):
        client_ssl("http://127.0.0.1:8000", pin_sha256="AB" * 32)


def test_bad_ca_files_and_pins_are_refused(tmp_path, authority):
    ca = tmp_path / "ca.pem"
    with pytest.raises(TlsError, match="does not exist"):
        client_ssl("https://127.0.0.1:1", ca_cert=ca)
    ca.write_text("not a certificate")
    with pytest.raises(TlsError, match="holds no PEM certificate"):
        client_ssl("https://127.0.0.1:1", ca_cert=ca)
    authority.cert_pem.write_to_path(str(ca))
    with pytest.raises(TlsError, match="not both"):
        client_ssl("https://127.0.0.1:1", ca_cert=ca, pin_sha256="AB" * 32)
    with pytest.raises(TlsError, match="--pin-sha256: .*64 hex digits"):
        client_ssl("https://127.0.0.1:1", pin_sha256="AB" * 31)
    assert isinstance(client_ssl("https://127.0.0.1:1", ca_cert=ca), ssl.SSLContext)


class _Answer(BaseHTTPRequestHandler):
    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def https_server(leaf):
    """An HTTPS server on 127.0.0.1 presenting `leaf` (signed by `authority`)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def leaf_fingerprint(leaf) -> str:
    return fingerprint_sha256(leaf.cert_chain_pems[0].bytes())


def test_the_right_ca_is_trusted(https_server, authority, tmp_path):
    ca = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca))
    context = client_ssl(https_server, ca_cert=ca)
    assert httpx.get(f"{https_server}/health", verify=context).json() == {"status": "ok"}


def test_a_pinned_leaf_is_trusted_and_nothing_else(https_server, leaf):
    context = client_ssl(https_server, pin_sha256=leaf_fingerprint(leaf).lower())
    assert httpx.get(f"{https_server}/health", verify=context).status_code == 200
    # the pinned context verifies every connection: another certificate fails
    other = trustme.CA().issue_cert("127.0.0.1")
    stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.configure_cert(stranger)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        threading.Thread(target=_handshake_once, args=(listener, stranger), daemon=True).start()
        with (
            pytest.raises(ssl.SSLCertVerificationError),
            socket.create_connection(("127.0.0.1", port)) as raw,
        ):
            context.wrap_socket(raw, server_hostname="127.0.0.1")


def _handshake_once(listener: socket.socket, context: ssl.SSLContext) -> None:
    connection, _ = listener.accept()
    try:
        context.wrap_socket(connection, server_side=True)
    except (ssl.SSLError, OSError):
        pass
    finally:
        connection.close()


def test_a_wrong_pin_is_refused_naming_both_fingerprints(https_server, leaf):
    wrong = "00" * 32
    with pytest.raises(TlsError) as refused:
        client_ssl(https_server, pin_sha256=wrong)
    message = str(refused.value)
    assert leaf_fingerprint(leaf) in message
    assert format_fingerprint(wrong) in message
    assert "refusing to connect" in message


def test_a_pin_needs_a_server_that_speaks_tls(http_server):
    with pytest.raises(TlsError, match="did not complete a TLS handshake"):
        client_ssl(f"https://{http_server}", pin_sha256="AB" * 32)


def test_an_unreachable_server_fails_or_is_waited_for(http_server):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"https://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(TlsError, match="cannot reach"):
        client_ssl(closed, pin_sha256="AB" * 32)
    calls = []
    with pytest.raises(Stopped):
        client_ssl(closed, pin_sha256="AB" * 32, should_stop=lambda: calls.append(1) or True)
    assert calls


def test_a_failed_verification_says_what_to_do(https_server):
    with pytest.raises(httpx.ConnectError) as failed:
        httpx.get(f"{https_server}/health", verify=ssl.create_default_context())
    refusal = certificate_error(failed.value, https_server)
    assert isinstance(refusal, TlsError)
    assert "--ca-cert" in str(refusal) and "--pin-sha256" in str(refusal)
    assert certificate_error(httpx.ConnectError("connection refused"), https_server) is None


def test_an_https_url_to_a_plain_http_server_is_named(http_server):
    with pytest.raises(httpx.ConnectError) as failed:
        httpx.get(f"https://{http_server}/health")
    assert "does not speak TLS" in str(certificate_error(failed.value, http_server))


def test_the_client_does_not_retry_a_certificate_it_cannot_verify(https_server):
    client = CoordinatorClient(https_server, verify=ssl.create_default_context())
    try:
        with pytest.raises(TlsError, match="failed verification"):
            client.request("GET", "/health")
    finally:
        client.close()


def test_registration_does_not_retry_a_certificate_it_cannot_verify(https_server, tmp_path):
    login = NodeLogin(tmp_path, https_server, "n1", "ct_enroll_" + "x" * 30)
    with (
        httpx.Client(base_url=https_server, verify=ssl.create_default_context()) as http,
        pytest.raises(TlsError, match="--ca-cert"),
    ):
        login.login(http)
