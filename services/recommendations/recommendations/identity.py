"""Workload identity from certificate files, as the Rust services read it.

`--tls-dir` holds `tls.crt` (leaf first, then any intermediates), `tls.key`
and `ca.crt` (the trust bundle), the layout of a mounted Kubernetes TLS
Secret. The leaf's one URI SAN is the workload's SPIFFE ID
`spiffe://<trust-domain>/ns/<namespace>/sa/<service>`. The files are
re-read when they change (checked at most once a second, on a new
handshake), so certificates and the CA rotate without a restart; material
that does not load, or has expired, is refused and the last good one stays.
"""

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("recommendations.identity")

FILES = ("tls.crt", "tls.key", "ca.crt")


class IdentityError(Exception):
    """Certificate files that cannot serve as this workload's identity."""


@dataclass(frozen=True)
class Material:
    """One loaded set of files."""

    chain: bytes
    key: bytes
    bundle: bytes
    spiffe_id: str
    not_after: float  # Unix time
    stamp: tuple


def spiffe_ids(cert):
    """The certificate's spiffe:// URI SANs."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]


def parse_spiffe_id(value):
    """(trust_domain, namespace, service) of `spiffe://td/ns/<ns>/sa/<sa>`, or None."""
    if not value.startswith("spiffe://"):
        return None
    parts = value[len("spiffe://") :].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts):
        return None
    return parts[0], parts[2], parts[4]


def _stamp(directory):
    return tuple(os.stat(os.path.join(directory, f)).st_mtime_ns for f in FILES)


def load(directory):
    """Loads and checks the files in `directory`."""
    try:
        stamp = _stamp(directory)
        data = {}
        for name in FILES:
            with open(os.path.join(directory, name), "rb") as f:
                data[name] = f.read()
    except OSError as e:
        raise IdentityError(f"--tls-dir: cannot read {e.filename}: {e.strerror}") from e
    try:
        leaf = x509.load_pem_x509_certificates(data["tls.crt"])[0]
        x509.load_pem_x509_certificates(data["ca.crt"])
        key = serialization.load_pem_private_key(data["tls.key"], password=None)
    except ValueError as e:
        raise IdentityError(f"--tls-dir {directory}: not PEM certificates and key: {e}") from e
    # The files are replaced one at a time (a Secret update, or the identity
    # agent's renames): a read between two replacements sees a new
    # certificate with the old key. Refused, so gRPC never gets the pair;
    # the next check (a second later) reads both new files.
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != leaf.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise IdentityError(f"--tls-dir {directory}: tls.key does not match tls.crt (files being replaced?)")
    ids = spiffe_ids(leaf)
    if len(ids) != 1 or parse_spiffe_id(ids[0]) is None:
        raise IdentityError(
            f"--tls-dir {directory}: tls.crt must carry exactly one SPIFFE ID "
            f"spiffe://<trust-domain>/ns/<ns>/sa/<service> as a URI SAN, found {ids}"
        )
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= time.time():
        raise IdentityError(f"--tls-dir {directory}: the certificate of {ids[0]} has expired")
    return Material(data["tls.crt"], data["tls.key"], data["ca.crt"], ids[0], not_after, stamp)


class FileIdentity:
    """This workload's identity from `directory`, reloaded on change."""

    def __init__(self, directory, on_reload=None):
        self.directory = directory
        self.material = load(directory)
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._on_reload = on_reload

    @property
    def spiffe_id(self):
        return self.material.spiffe_id

    def _config(self, material):
        return grpc.ssl_server_certificate_configuration(
            [(material.key, material.chain)], root_certificates=material.bundle
        )

    def _fetch(self):
        # Called by gRPC core before a handshake: None keeps the current
        # configuration.
        with self._lock:
            now = time.monotonic()
            if now - self._checked < 1.0:
                return None
            self._checked = now
            try:
                if _stamp(self.directory) == self.material.stamp:
                    return None
                material = load(self.directory)
            except (OSError, IdentityError) as e:
                log.error("certificate files changed but do not load; keeping the last good ones: %s", e)
                return None
            self.material = material
        log.info("certificates reloaded for %s (expire at %d)", material.spiffe_id, material.not_after)
        if self._on_reload:
            self._on_reload(material)
        return self._config(material)

    def server_credentials(self):
        """mTLS: a client certificate from the trust bundle is required."""
        return grpc.dynamic_ssl_server_credentials(
            self._config(self.material), self._fetch, require_client_authentication=True
        )


def caller_identity(context):
    """The verified SPIFFE ID of the caller's client certificate, or None
    (plaintext, or a certificate without exactly one SPIFFE ID)."""
    auth = context.auth_context() or {}
    pem = auth.get("x509_pem_cert")
    return _identity_of(pem[0]) if pem else None


@functools.lru_cache(maxsize=1024)
def _identity_of(pem):
    # Parsed once per distinct certificate, not once per call.
    try:
        ids = spiffe_ids(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None
    if len(ids) != 1 or parse_spiffe_id(ids[0]) is None:
        return None
    return ids[0]
