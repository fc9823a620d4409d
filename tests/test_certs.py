import ipaddress
from pathlib import Path

import pytest
from cryptography import x509

from fedglm.certs import CertPaths, check_certificate_file, make_certificates
from fedglm.errors import InputError


def test_certificate_names_and_key_modes(certs: CertPaths) -> None:
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert certs.ca_key.stat().st_mode & 0o777 == 0o600
    assert certs.server_key.stat().st_mode & 0o777 == 0o600


def test_dns_names_and_refusals(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, hosts=["coord.example.org"])
    sans = (
        x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert "coord.example.org" in sans.get_values_for_type(x509.DNSName)
    with pytest.raises(InputError, match="already exists"):
        make_certificates(tmp_path, hosts=["x"])
    with pytest.raises(InputError, match="not an IP address or a DNS name"):
        make_certificates(tmp_path / "b", hosts=["http://x"])


def test_check_certificate_file(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("hello")
    with pytest.raises(InputError, match="not a PEM certificate"):
        check_certificate_file(bad, "ca_cert")
    with pytest.raises(InputError, match="does not exist"):
        check_certificate_file(tmp_path / "none.crt", "ca_cert")
