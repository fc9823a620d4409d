"""`fedglm certs`: a private certificate authority and a server certificate for the coordinator.

Files written to the output folder (keys are mode 0600 and never leave the coordinator):
  ca.crt       the CA certificate: give it to every hospital (their `ca_cert`)
  ca.key       the CA's private key: keep it offline
  server.pem   the SuperLink's certificate, for the hosts asked for plus 127.0.0.1 and localhost
  server.key   the SuperLink's private key
Keys are ECDSA P-256; certificates are signed with SHA-256.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedglm.atomic import atomic_write
from fedglm.errors import InputError, check_out_folder

CERT_FILES = ("ca.crt", "ca.key", "server.pem", "server.key")
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def cert_paths(folder: Path) -> CertPaths:
    return CertPaths(*(folder / name for name in CERT_FILES))


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise InputError("--host: an empty host name was given")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in host):
                raise InputError(f"--host {host!r}: not an IP address or a DNS name") from None
            names.append(x509.DNSName(host))
    return names


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(path, lambda handle: handle.write(pem))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    pem = cert.public_bytes(serialization.Encoding.PEM)
    atomic_write(path, lambda handle: handle.write(pem))


MAX_DAYS = 36_525


def make_certificates(
    folder: Path, *, hosts: Sequence[str], days: int = 365, overwrite: bool = False
) -> CertPaths:
    """Create a CA and a server certificate valid for `hosts` (IP addresses or DNS names)."""
    if not 1 <= days <= MAX_DAYS:
        raise InputError(f"--days {days}: must be from 1 to {MAX_DAYS} (100 years)")
    check_out_folder(folder)
    if not hosts:
        raise InputError("give at least one --host the coordinator is reached at")
    paths = cert_paths(folder)
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if existing and not overwrite:
        raise InputError(f"{existing[0]} already exists; use another --out folder or --force")
    # Flower's own helper processes on the coordinator reach the SuperLink over loopback.
    hosts = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    sans = _subject_alt_names(hosts)
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedglm federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    folder.mkdir(parents=True, exist_ok=True)
    _write_key(paths.ca_key, ca_key)
    _write_cert(paths.ca_cert, ca_cert)
    _write_key(paths.server_key, server_key)
    _write_cert(paths.server_cert, server_cert)
    return paths


def check_certificate_file(path: Path, what: str) -> None:
    """Fail with one line if `path` is missing or is not a PEM certificate."""
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; make one with `fedglm certs`")
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise InputError(f"{what} {path} is not a PEM certificate") from None
