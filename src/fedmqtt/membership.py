"""Adding and revoking one device in a secure profile made by ``fedmqtt broker init``, leaving the others alone.

    add_agent(Path("secure"), "a-94b1b10982e6a145")      # fedmqtt broker add-agent --dir secure a-94b...
    revoke_agent(Path("secure"), "a-94b1b10982e6a145")   # fedmqtt broker revoke --dir secure a-94b...

``add_agent`` appends a password hash to ``passwd`` and an ACL block to ``acl``, writes the device's env file
and, when the profile uses client certificates, issues one (this needs ``ca.key``). ``revoke_agent`` removes
the device's ``passwd`` line, ACL block and env file, and puts its client certificate's serial on the
certificate revocation list ``crl.pem`` (signed by the CA, named by ``crlfile`` in mosquitto.conf), so a
copied certificate is refused at the TLS handshake even by a broker whose password file is restored from
a backup. Mosquitto reads none of this until it reloads: send it SIGHUP (``kill -HUP <pid>``, or
``docker compose kill -s HUP mosquitto``); it re-reads the password file, the ACL, its certificates and the
CRL. An already connected device is cut off at once by the ACL (its publishes are no longer authorised) and
cannot connect again.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from fedmqtt.certificates import cert_pem, crl_pem, issue, key_pem
from fedmqtt.errors import ConfigError
from fedmqtt.files import atomic_write
from fedmqtt.security import (
    AGGREGATOR,
    MODEL_SIGNING_KEY,
    Identity,
    _write_private,
    agent_acl,
    check_username,
    load_env_file,
    mosquitto_password_hash,
)
from fedmqtt.signing import public_of

CRL_FILE = "crl.pem"


@dataclass(frozen=True)
class Revoked:
    """What ``revoke_agent`` removed."""

    agent: str
    password: bool  # its passwd line
    acl: bool  # its ACL block
    certificate_serial: int | None  # put on the CRL (None: the profile has no client certificate for it)


def users(directory: Path) -> list[str]:
    """Usernames in the profile's password file."""
    return [line.split(":", 1)[0] for line in _read(directory / "passwd").splitlines() if ":" in line]


def uses_client_certs(directory: Path) -> bool:
    return re.search(r"^require_certificate\s+true\s*$", _read(directory / "mosquitto.conf"), re.M) is not None


def add_agent(directory: Path, agent: str) -> Identity:
    """Give a new device a password, ACL block, env file (and client certificate if the profile uses them)."""
    d = Path(directory).resolve()
    agent = check_username(agent, "agent id")
    if agent in users(d):
        raise ConfigError(f"{agent!r} is already in {d / 'passwd'}; revoke it first to re-issue credentials")
    cert = key = None
    if uses_client_certs(d):
        ca_key, ca_cert = _load_ca(d)
        k, c = issue(ca_key, ca_cert, agent, (), server=False, days=_days_left(ca_cert))
        cert, key = d / "clients" / f"{agent}.crt", d / "clients" / f"{agent}.key"
        _write_private(key, key_pem(k))
        cert.write_bytes(cert_pem(c))
    password = secrets.token_urlsafe(24)
    with (d / "passwd").open("a") as f:
        f.write(f"{agent}:{mosquitto_password_hash(password)}\n")
    acl = _read(d / "acl").rstrip("\n")
    atomic_write(d / "acl", (acl + "\n\n" + "\n".join(agent_acl(_acl_base(acl), agent)) + "\n").encode(), 0o644)
    env = {"FEDMQTT_BROKER_URL": _broker_url(d), "FEDMQTT_USERNAME": agent, "FEDMQTT_PASSWORD": password,
           "FEDMQTT_CA_FILE": str(d / "ca.crt")}
    if cert and key:
        env |= {"FEDMQTT_CERT_FILE": str(cert), "FEDMQTT_KEY_FILE": str(key)}
    if (d / MODEL_SIGNING_KEY).is_file():
        env["FEDMQTT_MODEL_KEY"] = public_of((d / MODEL_SIGNING_KEY).read_bytes())
    env["FEDMQTT_AGENT_ID"] = agent
    env_file = d / "env" / f"{agent}.env"
    _write_private(env_file, f"# fedmqtt identity {agent!r}: keep this file on its device only.\n"
                   + "".join(f"{k}={v}\n" for k, v in env.items()))
    return Identity(agent, password, cert, key, env_file)


def revoke_agent(directory: Path, agent: str) -> Revoked:
    """Remove a device's password and ACL block, revoke its client certificate, delete its files."""
    d = Path(directory).resolve()
    agent = check_username(agent, "agent id")
    if agent == AGGREGATOR:
        raise ConfigError("refusing to revoke the aggregator's identity; re-run broker init to rotate it")
    serial = None
    cert = d / "clients" / f"{agent}.crt"
    if cert.exists():  # first, as it needs the CA key: without it, nothing is changed
        serial = revoke_certificate(d, cert)
        cert.unlink()
        (d / "clients" / f"{agent}.key").unlink(missing_ok=True)
    lines = _read(d / "passwd").splitlines()
    kept = [ln for ln in lines if ln.split(":", 1)[0] != agent]
    _write_private(d / "passwd", "".join(f"{ln}\n" for ln in kept))
    acl, removed_acl = _without_block(_read(d / "acl"), agent)
    atomic_write(d / "acl", acl.encode(), 0o644)
    (d / "env" / f"{agent}.env").unlink(missing_ok=True)
    if len(kept) == len(lines) and not removed_acl and serial is None:
        raise ConfigError(f"{agent!r} is not in the profile in {d}")
    return Revoked(agent, len(kept) != len(lines), removed_acl, serial)


def revoke_certificate(directory: Path, cert_file: Path) -> int:
    """Add a client certificate's serial to the profile's CRL (re-signed by the CA); returns the serial.
    Also makes sure mosquitto.conf names the CRL (``crlfile``)."""
    from cryptography import x509

    d = Path(directory).resolve()
    ca_key, ca_cert = _load_ca(d)
    serial = x509.load_pem_x509_certificate(Path(cert_file).read_bytes()).serial_number
    crl_path = d / CRL_FILE
    old = list(x509.load_pem_x509_crl(crl_path.read_bytes())) if crl_path.exists() else []
    kept = [e for e in old if e.serial_number != serial]
    new = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(dt.datetime.now(dt.UTC)).build()
    crl_path.write_bytes(crl_pem(ca_key, ca_cert, [*kept, new]))
    _name_crl_in_config(d)
    return serial


def revoked_serials(directory: Path) -> set[int]:
    """Serials on the profile's CRL (empty without one)."""
    from cryptography import x509

    path = Path(directory) / CRL_FILE
    return {e.serial_number for e in x509.load_pem_x509_crl(path.read_bytes())} if path.exists() else set()


# ---- helpers ----------------------------------------------------------------------------------------------
def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} not found: is {path.parent} a profile made by `fedmqtt broker init`?") from exc


def _load_ca(d: Path):  # type: ignore[no-untyped-def]  # (EC private key, x509.Certificate)
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key_file = d / "ca.key"
    if not key_file.exists():
        raise ConfigError(f"{key_file} not found: issuing or revoking a certificate needs the CA key; run this "
                          "where the CA key is kept (it should be offline), then copy the results back")
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    return key, x509.load_pem_x509_certificate(_read(d / "ca.crt").encode())


def _days_left(ca_cert) -> int:  # type: ignore[no-untyped-def]
    left = (ca_cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    if left < 1:
        raise ConfigError("the profile's CA has expired; re-run broker init")
    return int(left)


def _acl_base(acl: str) -> str:
    """The federation's topic base, from the aggregator's ``topic readwrite <base>/#`` line."""
    m = re.search(r"^topic readwrite (\S+)/#\s*$", acl, re.M)
    if m is None:
        raise ConfigError("the ACL has no aggregator block (`topic readwrite <base>/#`)")
    return m.group(1)


def _without_block(acl: str, user: str) -> tuple[str, bool]:
    """The ACL without ``user``'s block (its ``user`` line up to the next ``user`` line or blank line)."""
    out: list[str] = []
    skipping = found = False
    for line in acl.splitlines():
        if line.strip().startswith("user "):
            skipping = line.split(None, 1)[1].strip() == user
            found = found or skipping
        elif not line.strip() and skipping:
            skipping = False
            continue
        if not skipping:
            out.append(line)
    return "\n".join(out).rstrip("\n") + "\n", found


def _broker_url(d: Path) -> str:
    for env_file in sorted((d / "env").glob("*.env")):
        url = load_env_file(env_file).get("FEDMQTT_BROKER_URL")
        if url:
            return url
    m = re.search(r"^listener\s+(\d+)", _read(d / "mosquitto.conf"), re.M)
    return f"mqtts://localhost:{m.group(1) if m else 8883}"


def _name_crl_in_config(d: Path) -> None:
    """Profiles made by ``broker init --client-certs`` name the CRL already; older ones get the line."""
    conf = d / "mosquitto.conf"
    text = _read(conf)
    if not re.search(r"^crlfile\s", text, re.M):
        conf.write_text(text + f"# Revoked client certificates (`fedmqtt broker revoke`).\ncrlfile {d / CRL_FILE}\n")
