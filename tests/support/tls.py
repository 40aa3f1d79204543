"""A throwaway certificate authority and server certificates for TLS peers on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=2)


def _new_key() -> rsa.RSAPrivateKey:
    # RSA because the token server signs RS256 with a key made here.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _builder(
    subject: str, issuer: x509.Name, public_key: rsa.RSAPublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True)
class TestCA:
    """A CA certificate (PEM at ca_path) and its key (PEM at key_path, also held as `key`)."""

    __test__ = False  # not a pytest test class

    ca_path: Path
    key_path: Path
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    def issue_server(
        self, dir: Path, names: Sequence[str] = ("127.0.0.1", "localhost")
    ) -> tuple[Path, Path]:
        """A server certificate for names (IP or DNS SANs): (cert_path, key_path) in dir."""
        dir.mkdir(parents=True, exist_ok=True)
        key = _new_key()
        cert = (
            _builder(names[0], self.cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = dir / "server.crt", dir / "server.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return cert_path, key_path

    def cert_dir(self, dir: Path) -> Path:
        """dir holding only this CA as ca.crt: for skopeo --cert-dir / --dest-cert-dir."""
        dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.ca_path, dir / "ca.crt")
        return dir

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_path))


def make_ca(dir: Path, name: str = "fetchd test CA") -> TestCA:
    """A new self-signed CA written to dir/ca.crt and dir/ca.key."""
    dir.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    ca_path, key_path = dir / "ca.crt", dir / "ca.key"
    ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return TestCA(ca_path=ca_path, key_path=key_path, cert=cert, key=key)
