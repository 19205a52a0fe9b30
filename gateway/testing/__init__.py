"""Tools for your own tests and for trying the gateway: the WeChat simulator, an embedded
redis-server and the demo. Not used by the server itself."""
