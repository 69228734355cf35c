"""Development tools around the proxy, not part of it: a local stand-in for STS
(``jwt-proxy local-sts``) and the demo with its JWT-verifying echo upstream
(``jwt-proxy demo``). The proxy never imports them; the CLI loads them on demand.
"""
