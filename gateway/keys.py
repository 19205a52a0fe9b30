"""Keys: those derived from ``session.signing_keys`` (JWT key ids, session_key encryption)
and the identity assertion's private keys.

Each signing key gets a key id (so a token names the key that signed it and verification
never tries keys in turn) and its own AES-256-GCM key derived with HKDF, so rotating the
signing keys rotates encryption at rest too, and sessions sealed under an older key stay
readable while that key is still listed.
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


_KID_BYTES = 9


def _derive(key: bytes, purpose: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=b"wx-gateway/" + purpose).derive(key)


class Keyring:
    def __init__(self, signing_keys: tuple[bytes, ...]) -> None:
        if not signing_keys:
            raise ValueError("at least one signing key is required")
        self._signing: dict[str, bytes] = {}
        self._aead: dict[str, AESGCM] = {}
        for key in signing_keys:
            kid = base64.urlsafe_b64encode(_derive(key, b"kid", _KID_BYTES)).decode()
            self._signing[kid] = key
            self._aead[kid] = AESGCM(_derive(key, b"session-key-encryption", 32))
        self.current_kid = next(iter(self._signing))
        # Keys openid hashes in logs: correlates a user's lines without naming the user.
        self.log_key = _derive(signing_keys[0], b"log-openid", 32)

    @property
    def current_key(self) -> bytes:
        return self._signing[self.current_kid]

    def signing_key(self, kid: str) -> bytes | None:
        return self._signing.get(kid)

    def seal(self, plaintext: bytes, context: bytes) -> str:
        """Encrypt with the current key; ``context`` binds the ciphertext to its owner."""
        nonce = os.urandom(12)
        sealed = self._aead[self.current_kid].encrypt(nonce, plaintext, context)
        return f"{self.current_kid}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def seal_bytes(self, plaintext: bytes, context: bytes) -> bytes:
        """``seal`` in compact binary: the raw 9-byte key id, the nonce, the ciphertext."""
        nonce = os.urandom(12)
        sealed = self._aead[self.current_kid].encrypt(nonce, plaintext, context)
        return base64.urlsafe_b64decode(self.current_kid) + nonce + sealed

    def open_bytes(self, data: bytes, context: bytes) -> bytes:
        kid = base64.urlsafe_b64encode(data[:_KID_BYTES]).decode()
        return self.open(f"{kid}.{base64.urlsafe_b64encode(data[_KID_BYTES:]).decode()}",
                         context)

    def open(self, token: str, context: bytes) -> bytes:
        """Decrypt what ``seal`` produced; ValueError if the key is gone or data was altered."""
        kid, _, data = token.partition(".")
        aead = self._aead.get(kid)
        if aead is None:
            raise ValueError("sealed with a signing key that is no longer configured")
        try:
            raw = base64.urlsafe_b64decode(data)
            return aead.decrypt(raw[:12], raw[12:], context)
        except (InvalidTag, ValueError) as exc:
            raise ValueError("sealed value is corrupt or belongs to another session") from exc


# The identity assertion's signing keys (identity_assertion.keys).
ALGORITHMS = ("ES256", "RS256", "EdDSA")
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def load_private_key(pem: str, algorithm: str) -> PrivateKey:
    """The PEM private key for ``algorithm``; ValueError naming what is wrong."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
    expected: dict[str, type] = {"ES256": ec.EllipticCurvePrivateKey,
                                 "RS256": rsa.RSAPrivateKey,
                                 "EdDSA": ed25519.Ed25519PrivateKey}
    if not isinstance(key, expected[algorithm]):
        raise ValueError(f"is not a key for {algorithm}")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name != "secp256r1":
        raise ValueError("ES256 needs a P-256 (secp256r1) key")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise ValueError("RS256 needs an RSA key of at least 2048 bits")
    return key  # type: ignore[return-value]


# Alipay's RSA2 keys (apps[].private_key, apps[].alipay_public_key). Alipay's console and key
# tool hand them out as bare base64 (DER, PKCS#8 or PKCS#1) as well as PEM; both are taken.
def _rsa_der(text: str) -> bytes | None:
    """The DER bytes of a bare base64 key, None when ``text`` is PEM."""
    if text.lstrip().startswith("-----BEGIN"):
        return None
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except ValueError:
        raise ValueError("neither a PEM key nor base64") from None


def load_rsa_private_key(text: str) -> rsa.RSAPrivateKey:
    """An unencrypted RSA private key of at least 2048 bits; ValueError naming what is wrong."""
    der = _rsa_der(text)
    try:
        key = (serialization.load_pem_private_key(text.encode(), password=None) if der is None
               else serialization.load_der_private_key(der, password=None))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted RSA private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("is not an RSA private key (RSA2 signs with RSA)")
    if key.key_size < 2048:
        raise ValueError("RSA2 needs an RSA key of at least 2048 bits")
    return key


def load_rsa_public_key(text: str) -> rsa.RSAPublicKey:
    """An RSA public key of at least 2048 bits; ValueError naming what is wrong."""
    der = _rsa_der(text)
    try:
        key = (serialization.load_pem_public_key(text.encode()) if der is None
               else serialization.load_der_public_key(der))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an RSA public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("is not an RSA public key (RSA2 verifies with RSA)")
    if key.key_size < 2048:
        raise ValueError("RSA2 needs an RSA key of at least 2048 bits")
    return key
