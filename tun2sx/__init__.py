"""tun2sx: turns the packets routed into a TUN device into proxied connections.

The package holds the program: TUN I/O, the trio runtime that drives the
sans-I/O stack in `stack`, the fake-IP DNS and its store, routing rules,
configuration, the CLI and the embedding entry point. Outbound protocols live
in the separate `outbounds` package.
"""

from tun2sx.control import deferred

# Before trio is imported: it imports modules tun2sx never uses (ssl, hmac, ...).
deferred.defer()

from tun2sx.control.api import Protect, Tun2sx, make_settings, run, run_async, start  # noqa: E402
from tun2sx.control.app import ConfigError, Settings  # noqa: E402

__all__ = [
    "ConfigError",
    "Protect",
    "Settings",
    "Tun2sx",
    "make_settings",
    "run",
    "run_async",
    "start",
]
