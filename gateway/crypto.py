"""WeChat's user-data cryptography: ``encryptedData`` decryption and ``rawData`` signatures."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import DecryptFailed, InvalidRequest


def _b64(field: str, value: str, *, length: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field} is not valid base64") from None
    if length is not None and len(raw) != length:
        raise InvalidRequest(f"{field} must decode to {length} bytes, got {len(raw)}")
    return raw


def decrypt(session_key: bytes, encrypted_data: str, iv: str) -> dict[str, Any]:
    """AES-128-CBC with PKCS#7 under the session's session_key (WeChat's base64 string).

    ``InvalidRequest`` for malformed input, ``DecryptFailed`` when the data does not decrypt to
    a JSON object under this key (wrong or stale session_key, or tampered data).
    """
    data = _b64("encrypted_data", encrypted_data)
    vector = _b64("iv", iv, length=16)
    if not data or len(data) % 16:
        raise InvalidRequest("encrypted_data must be a non-empty multiple of 16 bytes")
    try:
        key = base64.b64decode(session_key, validate=True)
        decryptor = Cipher(algorithms.AES(key), modes.CBC(vector)).decryptor()
        padded = decryptor.update(data) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        plain = unpadder.update(padded) + unpadder.finalize()
        result = json.loads(plain)
    except (ValueError, RecursionError):  # bad padding, not UTF-8 or JSON, an unusable key
        raise DecryptFailed("encrypted_data does not decrypt under this session's key") from None
    if not isinstance(result, dict):
        raise DecryptFailed("encrypted_data does not decrypt to a JSON object")
    return result


def signature_matches(session_key: bytes, raw_data: str, signature: str) -> bool:
    """WeChat's ``signature = sha1(rawData + session_key)``, compared in constant time."""
    if not signature.isascii():
        return False
    expected = hashlib.sha1(raw_data.encode() + session_key).hexdigest()
    return hmac.compare_digest(expected, signature.strip().lower())
