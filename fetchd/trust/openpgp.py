"""OpenPGP for fetchd: the only module that imports pysequoia (the Sequoia team's bindings).

What it does, and the policy it enforces (strict, stated in the README):

- :func:`read_keys` parses certificates (armored or binary, ≤ 1 MiB, ≤ 16 of them) into
  :class:`KeyInfo`: fingerprints, user IDs, which (sub)keys may sign, the algorithm, a
  revocation and its reason, the expiry. Secret keys are refused (nothing secret is stored).
- :func:`policy_problem` says why a key may not be used *now*: revoked for any reason
  (soft or hard: rkt refused every revocation too), expired now (a signature made while the
  key was valid does not count: a leaked expired key can back-date), RSA below 2048 bits,
  DSA/ElGamal or an algorithm fetchd does not know. RSA ≥ 2048, Ed25519, Ed448 and ECDSA
  (NIST curves) are accepted, on the primary key or a signing subkey.
- :func:`signature_info` reads one detached signature packet (armored or binary,
  ≤ 64 KiB) without the data, so a caller can check the issuer against its trusted keys
  *before* downloading what was signed (:func:`issuer_of`).
- :func:`verify_detached` verifies a file in a child process (``python -m
  fetchd.trust.verify``): pysequoia holds the GIL while it hashes (≈ 1.4 ms per MiB), so
  it never runs on the event loop, nor on a thread of it. The policy is checked before the
  child starts and again, on the key the child reports, after it ends. Bounded in time;
  the child is killed on timeout or cancellation.
- :func:`verify_inline` verifies a small inline-signed message in process (containers/image
  simple signing) and returns its payload.

Sequoia itself judges a signature at its creation time (RFC 9580); the checks here add
"valid now" on top of it. Errors: :class:`~fetchd.errors.TrustError` (not a key),
:class:`~fetchd.errors.KeyRefused` (policy), :class:`~fetchd.errors.SignatureInvalid`
(unreadable, tampered), :class:`~fetchd.errors.NotTrusted` (made by none of the keys).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fetchd.errors import KeyRefused, NotTrusted, SignatureInvalid, TrustError

if TYPE_CHECKING:
    from pysequoia.packet import Packet

KiB, MiB = 1 << 10, 1 << 20
MAX_KEY_FILE = 1 * MiB
MAX_CERTS = 16
MAX_SIGNATURE = 64 * KiB
MAX_INLINE = 256 * KiB
MIN_RSA_BITS = 2048
#: the directory holding the fetchd package, for the verifying child's PYTHONPATH
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)
#: bytes of the verifying child's stdout/stderr read at most
MAX_CHILD_OUTPUT = 64 * KiB

# Reason for Revocation codes (RFC 9580 5.2.3.31): 1 and 3 are soft, the rest hard.
_REASONS = {
    0: "hard-revoked: no reason given",
    1: "soft-revoked: superseded",
    2: "hard-revoked: key compromised",
    3: "soft-revoked: retired",
    32: "soft-revoked: user ID no longer valid",
}
_CURVES = {  # OID bytes (without the length octet) → name
    bytes.fromhex("2a8648ce3d030107"): "P-256",
    bytes.fromhex("2b81040022"): "P-384",
    bytes.fromhex("2b81040023"): "P-521",
    bytes.fromhex("2b06010401da470f01"): "Ed25519",
    bytes.fromhex("2b24030302080101070d"): "brainpoolP256r1",
    bytes.fromhex("2b2403030208010b0d"): "brainpoolP384r1",
    bytes.fromhex("2b2403030208010d0d"): "brainpoolP512r1",
}


@dataclass(frozen=True)
class KeyPart:
    """One key of a certificate: the primary (first in :attr:`KeyInfo.parts`) or a subkey."""

    fingerprint: str
    algorithm: str
    can_sign: bool
    expires: float | None = None
    revoked: str | None = None


@dataclass(frozen=True)
class KeyInfo:
    """One OpenPGP certificate, as read by :func:`read_keys`."""

    fingerprint: str  # primary, lowercase hex (40 for v4 keys)
    user_ids: tuple[str, ...]
    signing_keys: tuple[str, ...]  # fingerprints (primary and/or subkeys) that may sign
    algorithm: str  # the primary's: "RSA-3072", "Ed25519", …
    revoked: str | None  # None, or "hard-revoked: key compromised", "soft-revoked: superseded"…
    expires: float | None  # epoch seconds, or None
    raw: bytes  # the certificate, armored
    #: every key of the certificate, the primary first (for the policy on a signing subkey)
    parts: tuple[KeyPart, ...] = ()
    #: Sequoia's standard policy refused the certificate itself (e.g. RSA-1024): why
    invalid: str | None = None

    def part(self, fingerprint: str) -> KeyPart | None:
        return next((p for p in self.parts if p.fingerprint == fingerprint), None)

    def describe(self) -> str:
        """``9EF1 776C …  … (Alice <alice@example.com>)`` for messages."""
        who = f" ({self.user_ids[0]})" if self.user_ids else ""
        return display_fingerprint(self.fingerprint) + who


@dataclass(frozen=True)
class SigInfo:
    issuer_fingerprint: str | None
    issuer_key_id: str | None
    created: float


@dataclass(frozen=True)
class Verified:
    primary: str  # the certificate's fingerprint
    signer: str  # the (sub)key that made the signature
    user_ids: tuple[str, ...] = field(default=(), compare=False)


def _ps() -> Any:
    import pysequoia

    return pysequoia


def _reason(exc: BaseException) -> str:
    """pysequoia's message without its Rust backtrace, on one line."""
    text = str(exc).split("Stack backtrace:")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip() != "Caused by:"]
    lines = [ln.lstrip("0123456789: ") if ln[:1].isdigit() else ln for ln in lines]
    return ": ".join(lines)[:300] or type(exc).__name__


def display_fingerprint(fpr: str) -> str:
    """rkt's display: groups of 4 upper-case hex, a double space in the middle."""
    f = fpr.upper()
    groups = [f[i : i + 4] for i in range(0, len(f), 4)]
    half = len(groups) // 2
    return " ".join(groups[:half]) + "  " + " ".join(groups[half:])


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- reading keys ---------------------------------------------------------------------


def _algorithm(packet: Packet) -> str:
    """``RSA-3072``, ``Ed25519``, ``ECDSA-P-256``… from a public key packet's body."""
    from pysequoia.packet import PublicKeyAlgorithm as A

    body = packet.body
    algo = packet.key_algorithm
    version = body[0] if body else 0
    material = body[10:] if version in (5, 6) else body[6:]
    if algo in (A.RSAEncryptSign, A.RSASign, A.RSAEncrypt):
        bits = int.from_bytes(material[:2], "big") if len(material) >= 2 else 0
        return f"RSA-{bits}"
    if algo == A.DSA:
        bits = int.from_bytes(material[:2], "big") if len(material) >= 2 else 0
        return f"DSA-{bits}"
    if algo == A.Ed25519:
        return "Ed25519"
    if algo == A.Ed448:
        return "Ed448"
    if algo in (A.EdDSA, A.ECDSA, A.ECDH):
        n = material[0] if material else 0
        curve = _CURVES.get(bytes(material[1 : 1 + n]), "unknown curve")
        if algo == A.EdDSA:
            return curve if curve == "Ed25519" else f"EdDSA-{curve}"
        return f"{'ECDSA' if algo == A.ECDSA else 'ECDH'}-{curve}"
    return str(algo).rsplit(".", 1)[-1]


def _subpackets(body: bytes) -> list[tuple[int, bytes]]:
    """The hashed subpackets of a v4/v6 signature packet body (type, data)."""
    if len(body) < 6 or body[0] not in (4, 5, 6):
        return []
    if body[0] == 4:
        n, pos = int.from_bytes(body[4:6], "big"), 6
    else:
        n, pos = int.from_bytes(body[4:8], "big"), 8
    end = min(len(body), pos + n)
    out: list[tuple[int, bytes]] = []
    while pos < end:
        first = body[pos]
        if first < 192:
            length, pos = first, pos + 1
        elif first < 255:
            if pos + 1 >= end:
                break
            length, pos = ((first - 192) << 8) + body[pos + 1] + 192, pos + 2
        else:
            length, pos = int.from_bytes(body[pos + 1 : pos + 5], "big"), pos + 5
        if length < 1 or pos + length > end:
            break
        out.append((body[pos] & 0x7F, bytes(body[pos + 1 : pos + length])))
        pos += length
    return out


def _revocation_reason(packet: Packet) -> str:
    for kind, data in _subpackets(packet.body):
        if kind == 29 and data:
            text = _REASONS.get(data[0], f"hard-revoked: reason {data[0]}")
            note = data[1:].decode("utf-8", "replace").strip()[:120]
            return f"{text} ({note})" if note and note.lower() != text else text
    return _REASONS[0]


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _parts(cert: Any) -> tuple[list[KeyPart], list[str]]:
    """Every key of ``cert`` with its latest self-signature's flags/expiry/revocation,
    and its user ID packets."""
    from pysequoia.packet import PacketPile, SignatureType, Tag

    parts: list[dict[str, Any]] = []
    primary_can_sign: bool | None = None
    primary_sig_time = -1.0
    uids: list[str] = []
    for packet in PacketPile.from_bytes(bytes(cert)):
        tag = packet.tag
        if tag == Tag.UserID and packet.user_id is not None:
            uids.append(packet.user_id)
        if tag in (Tag.PublicKey, Tag.SecretKey, Tag.PublicSubkey, Tag.SecretSubkey):
            created = _ts(packet.key_created) or 0.0
            parts.append(
                {
                    "fingerprint": packet.fingerprint or "",
                    "algorithm": _algorithm(packet),
                    "created": created,
                    "sig_time": -1.0,
                    "can_sign": None,
                    "expires": None,
                    "revoked": None,
                    "primary": tag in (Tag.PublicKey, Tag.SecretKey),
                }
            )
            continue
        if tag != Tag.Signature or not parts:
            continue
        current = parts[-1]
        stype = packet.signature_type
        made = _ts(packet.signature_created) or 0.0
        if stype in (SignatureType.KeyRevocation, SignatureType.SubkeyRevocation):
            current["revoked"] = current["revoked"] or _revocation_reason(packet)
            continue
        self_sig = stype in (
            SignatureType.SubkeyBinding,
            SignatureType.DirectKey,
            SignatureType.PositiveCertification,
            SignatureType.GenericCertification,
            SignatureType.CasualCertification,
            SignatureType.PersonaCertification,
        )
        if not self_sig or made < current["sig_time"]:
            continue
        if current["primary"] and stype != SignatureType.DirectKey:
            # user ID bindings: the primary's flags come from the newest one that has them
            if made < primary_sig_time:
                continue
            primary_sig_time = made
        current["sig_time"] = made
        flags = packet.key_flags
        if flags is not None:
            current["can_sign"] = bool(flags.signing)
            if current["primary"]:
                primary_can_sign = bool(flags.signing)
        period = packet.key_validity_period
        if period is not None:
            current["expires"] = current["created"] + period.total_seconds()
    out = []
    for p in parts:
        can_sign = p["can_sign"]
        if p["primary"] and can_sign is None:
            can_sign = primary_can_sign if primary_can_sign is not None else True
        out.append(
            KeyPart(
                fingerprint=p["fingerprint"],
                algorithm=p["algorithm"],
                can_sign=bool(can_sign),
                expires=p["expires"],
                revoked=p["revoked"],
            )
        )
    return out, uids


def read_keys(data: bytes, what: str) -> list[KeyInfo]:
    """The certificates in ``data`` (armored or binary); TrustError if it holds none."""
    if len(data) > MAX_KEY_FILE:
        raise TrustError(f"{what} is larger than 1 MiB; it is not one OpenPGP public key")
    ps = _ps()
    from pysequoia.packet import PacketPile, Tag

    try:
        secret = any(
            p.tag in (Tag.SecretKey, Tag.SecretSubkey) for p in PacketPile.from_bytes(data)
        )
    except Exception as exc:
        raise TrustError(f"{what} is not an OpenPGP public key ({_reason(exc)})") from exc
    if secret:
        raise TrustError(
            f"{what} holds a secret key; give the public key (gpg --armor --export KEYID)"
        )
    try:
        certs = ps.Cert.split_bytes(data)
    except Exception as exc:
        raise TrustError(f"{what} is not an OpenPGP public key ({_reason(exc)})") from exc
    if not certs:
        raise TrustError(f"{what} holds no OpenPGP public key")
    if len(certs) > MAX_CERTS:
        raise TrustError(f"{what} holds {len(certs)} keys; at most {MAX_CERTS} are read")
    keys: list[KeyInfo] = []
    for cert in certs:
        try:
            parts, uid_packets = _parts(cert)
        except Exception as exc:
            raise TrustError(f"{what} is not an OpenPGP public key ({_reason(exc)})") from exc
        if not parts:
            raise TrustError(f"{what} holds a certificate without a primary key")
        invalid: str | None = None
        revoked: str | None = None
        expires: float | None = None
        try:
            user_ids = tuple(str(u) for u in cert.user_ids)
            if cert.is_revoked:
                revoked = parts[0].revoked or _REASONS[0]
            expires = _ts(cert.expiration)
        except Exception as exc:  # Sequoia's policy refused the certificate (RSA-1024…)
            invalid = _reason(exc)
            user_ids = tuple(uid_packets)
        raw = ps.armor(bytes(cert), ps.ArmorKind.PublicKey).encode()
        primary = parts[0]
        keys.append(
            KeyInfo(
                fingerprint=cert.fingerprint.lower(),
                user_ids=user_ids,
                signing_keys=tuple(p.fingerprint for p in parts if p.can_sign),
                algorithm=primary.algorithm,
                revoked=revoked,
                expires=expires if expires is not None else primary.expires,
                raw=raw,
                parts=tuple(parts),
                invalid=invalid,
            )
        )
    return keys


# --- policy ---------------------------------------------------------------------------


def _algorithm_problem(algorithm: str) -> str | None:
    if algorithm.startswith("RSA-"):
        bits = int(algorithm[4:] or 0)
        return None if bits >= MIN_RSA_BITS else f"{algorithm} is weaker than RSA-{MIN_RSA_BITS}"
    if algorithm in ("Ed25519", "Ed448", "ECDSA-P-256", "ECDSA-P-384", "ECDSA-P-521"):
        return None
    return f"{algorithm} is not accepted (only RSA ≥ 2048, Ed25519, Ed448 and ECDSA P-256/384/521)"


def policy_problem(key: KeyInfo, now: float, *, signer: str | None = None) -> str | None:
    """Why ``key`` may not be used at ``now``, or None: the certificate as a whole, and
    ``signer`` (a (sub)key fingerprint) if given, else whether any of its keys may sign."""
    if key.revoked:
        return f"revoked ({key.revoked})"
    if key.expires is not None and key.expires <= now:
        return f"expired on {_when(key.expires)}"
    problem = _algorithm_problem(key.algorithm)
    if problem:
        return problem
    if key.invalid:
        return f"not valid under Sequoia's standard policy ({key.invalid})"
    if signer is not None:
        return signer_problem(key, signer, now)
    if not any(signer_problem(key, fpr, now) is None for fpr in key.signing_keys):
        return "it has no key that may sign now"
    return None


def signer_problem(key: KeyInfo, signer: str, now: float) -> str | None:
    """Why the (sub)key ``signer`` of ``key`` may not sign at ``now``, or None."""
    part = key.part(signer)
    if part is None or not part.can_sign:
        return f"{display_fingerprint(signer)} is not a signing key of this certificate"
    if part is key.parts[0]:
        return None if part.can_sign else "its primary key may not sign"
    if part.revoked:
        return f"its signing subkey {display_fingerprint(signer)} is revoked ({part.revoked})"
    if part.expires is not None and part.expires <= now:
        return f"its signing subkey {display_fingerprint(signer)} expired on {_when(part.expires)}"
    return _algorithm_problem(part.algorithm)


def _refuse(key: KeyInfo, signer: str | None, what: str, now: float) -> None:
    problem = policy_problem(key, now, signer=signer)
    if problem is not None:
        raise KeyRefused(f"{what}: the signing key {key.describe()} is refused: {problem}")


# --- signatures -----------------------------------------------------------------------


def signature_info(sig: bytes, what: str) -> SigInfo:
    """The one signature packet of a detached signature (armored or binary)."""
    from pysequoia.packet import PacketPile, SignatureType, Tag

    if len(sig) > MAX_SIGNATURE:
        raise SignatureInvalid(f"{what} is larger than 64 KiB; it is not one signature")
    try:
        packets = list(PacketPile.from_bytes(sig))
    except Exception as exc:
        raise SignatureInvalid(f"{what} is not an OpenPGP signature ({_reason(exc)})") from exc
    if len(packets) != 1 or packets[0].tag != Tag.Signature:
        raise SignatureInvalid(
            f"{what} is not one OpenPGP signature ({len(packets)} packets: "
            f"{', '.join(str(p.tag).rsplit('.', 1)[-1] for p in packets[:4])})"
        )
    packet = packets[0]
    if packet.signature_type not in (SignatureType.Binary, SignatureType.Text):
        kind = str(packet.signature_type).rsplit(".", 1)[-1]
        raise SignatureInvalid(f"{what} is a {kind} signature, not a signature of data")
    created = packet.signature_created
    if created is None:
        raise SignatureInvalid(f"{what} has no creation time")
    fpr = packet.issuer_fingerprint
    kid = packet.issuer_key_id
    if not fpr and not kid:
        raise SignatureInvalid(f"{what} does not name the key that made it (no issuer)")
    return SigInfo(
        issuer_fingerprint=fpr.lower() if fpr else None,
        issuer_key_id=kid.lower() if kid else None,
        created=created.timestamp(),
    )


def _key_id(fpr: str) -> str:
    return fpr[:16] if len(fpr) == 64 else fpr[-16:]


def issuer_of(sig: SigInfo, keys: Sequence[KeyInfo]) -> KeyInfo | None:
    """The certificate among ``keys`` whose primary or signing subkey made ``sig``."""
    for key in keys:
        for fpr in key.signing_keys:
            if sig.issuer_fingerprint is not None:
                if sig.issuer_fingerprint == fpr:
                    return key
            elif sig.issuer_key_id is not None and sig.issuer_key_id == _key_id(fpr):
                return key
    return None


def issuer_text(sig: SigInfo) -> str:
    """The issuer of ``sig`` for messages (fingerprint display, else the key id)."""
    if sig.issuer_fingerprint:
        return display_fingerprint(sig.issuer_fingerprint)
    return f"key id {(sig.issuer_key_id or '').upper()}"


def _not_ours(sig: SigInfo, keys: Sequence[KeyInfo], what: str) -> NotTrusted:
    return NotTrusted(
        f"{what} is signed by {issuer_text(sig)}, which is not among the "
        f"{len(keys)} key(s) trusted for it"
    )


async def verify_detached(
    sig: bytes,
    data: Path,
    keys: Sequence[KeyInfo],
    what: str,
    *,
    timeout: float = 120,  # noqa: ASYNC109 (the contract: one bound for the whole child)
) -> Verified:
    """Verify ``sig`` over the file ``data`` in a child process (never on the loop)."""
    info = signature_info(sig, what)
    key = issuer_of(info, keys)
    if key is None:
        raise _not_ours(info, keys, what)
    hinted = info.issuer_fingerprint
    _refuse(key, hinted, what, time.time())
    request = json.dumps(
        {
            "sig": base64.b64encode(sig).decode(),
            "cert": base64.b64encode(key.raw).decode(),
        }
    ).encode()
    env = dict(os.environ)
    env["RUST_BACKTRACE"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    # -P and cwd "/": ``-m`` would put the working directory first on sys.path, and a
    # pysequoia.py (or fetchd/) there would then decide the verdict.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-P",
        "-m",
        "fetchd.trust.verify",
        str(data if data.is_absolute() else Path.cwd() / data),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd="/",
    )
    try:
        try:
            out, err = await asyncio.wait_for(proc.communicate(request), timeout)
        except TimeoutError:
            raise SignatureInvalid(
                f"{what}: verifying the signature took longer than {timeout:g} s; gave up"
            ) from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    answer: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        answer = json.loads(out[:MAX_CHILD_OUTPUT])
    if proc.returncode != 0 or not answer.get("ok"):
        reason = answer.get("error") or err[-500:].decode("utf-8", "replace").strip()
        if answer.get("kind") == "data":
            raise SignatureInvalid(f"{what}: {reason}")
        raise SignatureInvalid(
            f"{what}: the signature does not verify with {key.describe()}: "
            f"{reason or f'the verifier exited {proc.returncode}'}"
        )
    primary, signer = str(answer.get("primary", "")), str(answer.get("signer", ""))
    if primary != key.fingerprint:
        raise SignatureInvalid(
            f"{what}: the verifier reports key {primary!r}, not {key.fingerprint}"
        )
    _refuse(key, signer, what, time.time())
    return Verified(primary=primary, signer=signer, user_ids=key.user_ids)


def verify_inline(signed: bytes, keys: Sequence[KeyInfo], what: str) -> tuple[bytes, Verified]:
    """An inline-signed message (≤ 256 KiB): its payload and who signed it. In process."""
    if len(signed) > MAX_INLINE:
        raise SignatureInvalid(f"{what} is larger than 256 KiB; it is not a signature")
    if not keys:
        raise NotTrusted(f"{what}: no key is trusted to sign it")
    ps = _ps()
    certs = []
    for key in keys:
        try:
            certs.append(ps.Cert.from_bytes(key.raw))
        except Exception as exc:
            raise TrustError(f"{what}: trusted key {key.describe()}: {_reason(exc)}") from exc
    now = time.time()
    try:
        result = ps.verify(bytes=signed, store=lambda _ids: certs)
    except Exception as exc:
        raise SignatureInvalid(
            f"{what} does not verify with the {len(keys)} key(s) trusted for it ({_reason(exc)})"
        ) from exc
    if not result.valid_sigs or result.bytes is None:
        raise SignatureInvalid(f"{what} carries no valid signature by a trusted key")
    valid = result.valid_sigs[0]
    primary, signer = str(valid.certificate).lower(), str(valid.signing_key).lower()
    found = next((k for k in keys if k.fingerprint == primary), None)
    if found is None:
        raise SignatureInvalid(f"{what}: the verifier reports key {primary}, not one given")
    _refuse(found, signer, what, now)
    return bytes(result.bytes), Verified(primary=primary, signer=signer, user_ids=found.user_ids)
