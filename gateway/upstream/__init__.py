"""For upstreams: verify the gateway's signed identity assertion (``identity_assertion``).

An upstream that can be reached other than through the gateway must not trust plain
``X-WX-OpenID`` headers; it mounts one of these instead and reads a verified identity::

    # aiohttp
    from gateway.upstream import Verifier, aiohttp_middleware, WX_IDENTITY
    verifier = Verifier("https://gw.example.com/.well-known/jwks.json",
                        audience="http://orders:9000")
    app = web.Application(middlewares=[aiohttp_middleware(verifier)])
    # in a handler: request[WX_IDENTITY].openid; users are keyed by .appid and .openid
    # (.platform names the mini-program platform, .corpid a WeCom user's corp)

    # Starlette / FastAPI (any ASGI app)
    app.add_middleware(ASGIMiddleware, verifier=verifier)
    # in an endpoint: request.state.wx_identity.openid

Keys come from the gateway's JWKS (fetched with PyJWT's ``PyJWKClient``, cached, fetched
again for an unknown ``kid``); algorithms are pinned; audience and issuer are required;
clock skew is bounded by ``leeway``. Anything else is answered 401.
"""

from .middleware import WX_IDENTITY, ASGIMiddleware, aiohttp_middleware
from .verifier import InvalidAssertion, Verifier, WxIdentity

__all__ = ["ASGIMiddleware", "InvalidAssertion", "Verifier", "WX_IDENTITY", "WxIdentity",
           "aiohttp_middleware"]
