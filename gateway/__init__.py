"""wx-gateway: an authentication gateway for WeChat Mini Program backends."""

__version__ = "0.1.0"
