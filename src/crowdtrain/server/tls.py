"""HTTPS for the server: check a given certificate and key, or make a development certificate.

A development certificate (`--self-signed`) is its own CA: nodes trust it by pinning its SHA-256
fingerprint (`crowdtrain node --pin-sha256`), or by passing the file itself as `--ca-cert`.
It is kept in DATA_DIR/tls and reused while it is valid for a month more and names this host.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crowdtrain.files import write_atomic
from crowdtrain.settings import ServerSettings, SettingsError

log = logging.getLogger(__name__)

TLS_DIR = "tls"  # under data_dir
VALIDITY = datetime.timedelta(days=365)
RENEW_WITHIN = datetime.timedelta(days=30)  # make a new one when less validity than this is left
WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # bind addresses that name no interface


@dataclass(frozen=True)
class CertificateFiles:
    cert: Path
    key: Path


def development_files(data_dir: Path) -> CertificateFiles:
    folder = Path(data_dir) / TLS_DIR
    return CertificateFiles(folder / "cert.pem", folder / "key.pem")


def served_certificate(settings: ServerSettings) -> Path | None:
    """The certificate file the server presents, or None without TLS."""
    if settings.self_signed:
        return development_files(settings.data_dir).cert
    return settings.tls_cert


def uvicorn_tls_options(settings: ServerSettings) -> dict[str, Any]:
    """uvicorn.Config's ssl_certfile and ssl_keyfile (empty without TLS). Makes or reuses the
    development certificate with `self_signed`; checks a given pair, raising SettingsError."""
    if settings.self_signed:
        files = development_certificate(settings.data_dir, settings.host)
    elif settings.tls_cert is not None and settings.tls_key is not None:
        files = CertificateFiles(settings.tls_cert, settings.tls_key)
        check_certificate_pair(files)
    else:
        return {}
    return {"ssl_certfile": str(files.cert), "ssl_keyfile": str(files.key)}


def fingerprint_sha256(pem: bytes | str) -> str:
    """'AB:CD:...': the SHA-256 of the (first) certificate's DER bytes, as nodes pin it."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    der = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


# ---- a given certificate and key ----------------------------------------------------------


def check_certificate_pair(files: CertificateFiles) -> None:
    """Fail with a message naming the file and the fix unless `files` can serve HTTPS."""
    certificates = _read_certificates(files.cert, "tls_cert")
    key = _read_private_key(files.key, "tls_key")
    if _public_der(certificates[0].public_key()) != _public_der(key.public_key()):
        raise SettingsError(
            f"tls_key {files.key} is not the private key of the certificate in tls_cert "
            f"{files.cert}; give the key that was made with that certificate"
        )
    expires = certificates[0].not_valid_after_utc
    if expires <= datetime.datetime.now(datetime.timezone.utc):
        raise SettingsError(f"the certificate in tls_cert {files.cert} expired on {expires:%F}")
    try:  # what uvicorn will do; anything the checks above missed fails here, not in a worker
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        raise SettingsError(f"tls_cert {files.cert} and tls_key {files.key}: {exc}") from None


def _read(path: Path, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SettingsError(f"{setting}: the file {path} does not exist") from None
    except IsADirectoryError:
        raise SettingsError(f"{setting}: {path} is a directory; give a PEM file") from None
    except PermissionError:
        raise SettingsError(
            f"{setting}: cannot read {path} (permission denied); let the user running the "
            "server read it"
        ) from None


def _read_certificates(path: Path, setting: str) -> list[x509.Certificate]:
    data = _read(path, setting)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise SettingsError(
            f"{setting}: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ) from None


def _read_private_key(path: Path, setting: str):
    data = _read(path, setting)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "it has a password"
        raise SettingsError(
            f"{setting}: the key in {path} is protected by a password; give an unencrypted "
            f"copy (for example `openssl pkey -in {path} -out key.pem`, kept mode 600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise SettingsError(
            f"{setting}: {path} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)"
        ) from None


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---- the development certificate ----------------------------------------------------------


def certificate_names(bind_host: str) -> list[str]:
    """The names a development certificate is valid for: loopback, this machine's host name,
    and the bind address when it names one interface."""
    names = ["localhost", "127.0.0.1", "::1"]
    hostname = socket.gethostname()
    if hostname.isascii():
        names.append(hostname)
    if bind_host not in WILDCARD_HOSTS:
        names.append(bind_host)
    return list(dict.fromkeys(name.lower() for name in names))


def development_certificate(data_dir: Path, bind_host: str) -> CertificateFiles:
    """The certificate in DATA_DIR/tls, made anew unless the one there can be reused."""
    files = development_files(data_dir)
    names = certificate_names(bind_host)
    problem = _unusable(files, names)
    if problem is None:
        return files
    if files.cert.exists():
        log.warning("making a new development certificate: %s", problem)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(key, names)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(files.key, key_pem, mode=0o600)
    write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    files.cert.parent.chmod(0o700)
    return files


def _unusable(files: CertificateFiles, names: list[str]) -> str | None:
    """Why the development certificate on disk cannot be reused, or None when it can."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except FileNotFoundError:
        return "there is none"
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return f"{files.cert} or {files.key} is damaged"
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        return f"{files.key} is not the key of {files.cert}"
    if cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) < RENEW_WITHIN:
        return f"the old one expires on {cert.not_valid_after_utc:%F}"
    missing = set(names) - set(subject_names(cert))
    if missing:
        return f"the old one does not name {', '.join(sorted(missing))}"
    if files.key.stat().st_mode & 0o077:
        files.key.chmod(0o600)
    return None


def subject_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in a certificate's subjectAltName, as text."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    return dns + [str(address) for address in san.get_values_for_type(x509.IPAddress)]


def _self_signed(key: ec.EllipticCurvePrivateKey, names: list[str]) -> x509.Certificate:
    """A certificate for `names` that is its own CA, so it can be the one trust anchor."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "crowdtrain"),
            x509.NameAttribute(NameOID.COMMON_NAME, "crowdtrain development certificate"),
        ]
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little behind
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
