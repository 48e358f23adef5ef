"""Certificates and keys for the local control plane: one CA, serving certs, client certs."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from modeldeploy_dev import netpol, network, node

_VALIDITY = datetime.timedelta(days=3650)

# Client identities: (file stem, common name, organization). Each component gets its own
# identity so RBAC applies to it as in a real cluster; only the admin is in system:masters.
CLIENTS = (
    ("admin", "modeldeploy-admin", "system:masters"),
    ("controller-manager", "system:kube-controller-manager", None),
    ("scheduler", "system:kube-scheduler", None),
    ("kwok", "kwok-controller", "system:masters"),
    ("traefik", "modeldeploy-traefik", None),
    # Bound to the system:node-proxier ClusterRole by the API server's default RBAC.
    ("kube-proxy", "system:kube-proxy", None),
    ("apiserver-etcd-client", "kube-apiserver-etcd-client", None),
    # The real node's kubelet: the Node authorizer and NodeRestriction know it by this name.
    ("node", f"system:node:{node.NAME}", "system:nodes"),
    # The API server calling kubelets (logs, exec, port-forward).
    ("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"),
    # The real node's NetworkPolicy enforcer: reads pods, namespaces, policies and its node.
    ("kube-router", netpol.USER, None),
)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _issue(
    directory: Path,
    stem: str,
    subject: x509.Name,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    usages: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName] | None = None,
) -> None:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / f"{stem}.key", key)


def generate(directory: Path) -> None:
    """Writes ca.{crt,key}, serving certs, client certs and the service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("modeldeploy-local-ca"))
        .issuer_name(_name("modeldeploy-local-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
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
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "ca.key", ca_key)
    ca = (ca_cert, ca_key)

    loopback: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    apiserver_names: list[x509.GeneralName] = [
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
    ]
    server = [ExtendedKeyUsageOID.SERVER_AUTH]
    _issue(
        directory,
        "apiserver",
        _name("kube-apiserver"),
        ca,
        usages=server,
        # In a pod, the in-cluster client calls the `kubernetes` Service by its address.
        sans=loopback
        + apiserver_names
        + [x509.IPAddress(ipaddress.ip_network(network.SERVICE_CIDR)[1])],
    )
    _issue(
        directory,
        "kubelet",
        _name(f"system:node:{node.NAME}"),
        ca,
        usages=server,
        sans=[x509.DNSName(node.NAME), x509.IPAddress(ipaddress.ip_address(network.GATEWAY))],
    )
    _issue(
        directory,
        "etcd",
        _name("etcd"),
        ca,
        usages=[*server, ExtendedKeyUsageOID.CLIENT_AUTH],
        sans=loopback,
    )
    for stem, common_name, organization in CLIENTS:
        _issue(
            directory,
            stem,
            _name(common_name, organization),
            ca,
            usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        )
    _write_key(directory / "service-account.key", _key())
    sa_public = serialization.load_pem_private_key(
        (directory / "service-account.key").read_bytes(), password=None
    ).public_key()
    (directory / "service-account.pub").write_bytes(
        sa_public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
