"""Certificates shaped like the ones Sense generates for itself, for the TLS tests.

Sense's server certificate names the node's host name, not an address, and its CA does not
follow every rule of OpenSSL's strict mode (Python 3.13's default): here the CA's Basic
Constraints are not marked critical and no certificate carries key identifiers, which strict
verification refuses.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mqtt_starter.simulators.certs import CertPaths

_KEY = serialization.PrivateFormat.TraditionalOpenSSL


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_name(path.stem + "_key.pem")
        key_path.touch(mode=0o600)
        key_path.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, _KEY, serialization.NoEncryption())
        )


def write_sense_like_certs(folder: Path, host_name: str) -> CertPaths:
    """root.pem, a server certificate for `host_name` only, and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = f"{host_name}-CA"
    ca = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = CertPaths(folder)
    _write(paths.root, ca, None)
    for stem, subject, usage, names in (
        ("server", host_name, ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName(host_name)]),
        ("client", "QlikClient", ExtendedKeyUsageOID.CLIENT_AUTH, None),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(subject, ca_name, key).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if names is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        _write(folder / f"{stem}.pem", builder.sign(ca_key, hashes.SHA256()), key)
    return paths
