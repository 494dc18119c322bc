"""Secrets for an exposed verifier: a self-signed CA with server/client certificates, and auth tokens.

`make_certs` is what `specdec make-certs` runs for users without a certificate: a CA, a server cert
valid for the given hosts/IPs, and a client cert for mutual TLS. `read_token` loads the shared token
from a file or an environment variable; `bearer_metadata` is how a client presents it. No gRPC imports.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import secrets

TOKEN_ENV = "SPECDEC_AUTH_TOKEN"
AUTH_HEADER = "authorization"  # gRPC metadata key; value "Bearer <token>"


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata a client sends with every RPC (empty without a token)."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def read_file(path: str | os.PathLike | None) -> bytes | None:
    """The bytes of a PEM (or any) file, `~` expanded; None when no path is given."""
    return pathlib.Path(path).expanduser().read_bytes() if path else None


def read_token(path: str | os.PathLike | None, env: str = TOKEN_ENV) -> str | None:
    """The token in `path` (surrounding whitespace stripped), else $SPECDEC_AUTH_TOKEN, else None."""
    if path:
        token = pathlib.Path(path).expanduser().read_text().strip()
        if not token:
            raise ValueError(f"auth token file {path} is empty")
    else:
        token = os.environ.get(env, "").strip()
    if token and len(token) < 16:
        raise ValueError("the auth token is shorter than 16 characters; make one with `specdec make-certs --token`")
    return token or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def all_loopback(addresses: list[str]) -> bool:
    """Every HOST:PORT address is on this machine (and there is at least one)."""
    return bool(addresses) and all(is_loopback(address.rpartition(":")[0]) for address in addresses)


def _write(path: pathlib.Path, data: bytes, private: bool = False) -> None:
    """Private files are created mode 600 (never readable by others, not even briefly)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_certs(out_dir: str | os.PathLike, hosts: list[str], days: int = 365, token: bool = False) -> dict[str, pathlib.Path]:
    """Write ca.pem/ca.key, server.pem/server.key (SANs = hosts), client.pem/client.key (+ token.txt)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def build(subject: str, key, issuer_name, issuer_key, ca: bool, extensions=()) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for ext in extensions:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("specdec CA", ca_key, name("specdec CA"), ca_key, ca=True)
    sans = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    paths = {}
    for role, usage, extra in (("server", ExtendedKeyUsageOID.SERVER_AUTH, [x509.SubjectAlternativeName(sans)]),
                               ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(f"specdec {role}", key, ca_cert.subject, ca_key, ca=False,
                     extensions=[x509.ExtendedKeyUsage([usage]), *extra])
        _write(out / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write(out / f"{role}.key", pem_key(key), private=True)
        paths[role], paths[f"{role}_key"] = out / f"{role}.pem", out / f"{role}.key"
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", pem_key(ca_key), private=True)
    paths["ca"], paths["ca_key"] = out / "ca.pem", out / "ca.key"
    if token:
        _write(out / "token.txt", (secrets.token_urlsafe(32) + "\n").encode(), private=True)
        paths["token"] = out / "token.txt"
    return paths


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
