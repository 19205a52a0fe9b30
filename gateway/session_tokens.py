"""Session tokens: HS256 JWTs naming their session, minted and verified with pinned algorithms."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import jwt

from .errors import Unauthorized
from .keys import Keyring

ALGORITHM = "HS256"
MAX_TOKEN_LENGTH = 4096
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "aud", "sid"]


@dataclass(frozen=True, slots=True)
class Claims:
    sid: str
    openid: str
    appid: str
    issued_at: int
    expires_at: int


class TokenCodec:
    def __init__(self, keyring: Keyring, appids: tuple[str, ...]) -> None:
        self._keyring = keyring
        self._appids = list(appids)

    def mint(self, sid: str, openid: str, appid: str, issued_at: int, expires_at: int) -> str:
        # jti: two tokens minted in the same second (login, then refresh) still differ.
        claims = {"sid": sid, "sub": openid, "aud": appid, "iat": issued_at, "exp": expires_at,
                  "jti": secrets.token_urlsafe(9)}
        return jwt.encode(claims, self._keyring.current_key, algorithm=ALGORITHM,
                          headers={"kid": self._keyring.current_kid})

    def verify(self, token: str) -> Claims:
        """Return the claims of a genuine, unexpired token for a configured app, else raise."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("token is too long")
        if not token.isascii():  # a JWT is ASCII; undecodable header bytes arrive as surrogates
            raise Unauthorized("token is invalid")
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            key = self._keyring.signing_key(kid) if isinstance(kid, str) else None
            if key is None:
                raise Unauthorized("token was not signed by a configured signing key")
            # algorithms is pinned: 'none' and HS/RS confusion are refused by PyJWT itself.
            claims = jwt.decode(token, key, algorithms=[ALGORITHM], audience=self._appids,
                                options={"require": _REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token is for an app this gateway does not serve") from None
        except jwt.PyJWTError:
            raise Unauthorized("token is invalid") from None
        sid, sub, aud = claims["sid"], claims["sub"], claims["aud"]
        if not (isinstance(sid, str) and isinstance(sub, str) and isinstance(aud, str)
                and sid and sub):
            raise Unauthorized("token is invalid")
        return Claims(sid, sub, aud, int(claims["iat"]), int(claims["exp"]))
