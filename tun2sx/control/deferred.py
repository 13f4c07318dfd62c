"""Standard modules that trio imports at start but tun2sx never uses: loaded on first use.

trio imports `ssl` (for its TLS streams) and `hmac` (for DTLS cookies) when
it is itself imported; the two bring OpenSSL's libssl and libcrypto, about
5 MiB of an idle tun2sx's 30 MiB resident set, for features tun2sx does not
use (no outbound speaks TLS; Shadowsocks' crypto comes from `cryptography`).
trio also looks for the pthread library through `ctypes.util` (to name its
threads), which imports `shutil`, which imports `bz2` and `lzma` (libbz2,
liblzma) for its archive formats, and `tempfile`, which `ctypes.util` uses
only when `ldconfig` cannot name the library. trio's sockets import `idna`
(with its tables) to encode a non-ASCII host name given to
`getaddrinfo`, which only a direct connection to such a name makes (names
for the proxy are sent as they are). The two are about 0.25 MiB.

`defer()` puts a placeholder module in `sys.modules` for each of them not
imported yet; the first attribute read on it (trio's TLS code, an embedding
program's `ssl.create_default_context()`) runs the real module's code in
that same module object, so the module is the same object before and after
and nothing else notices. The standard library's `importlib.util.LazyLoader`
does the same but, on CPython 3.11, loads at the `import` statement itself
(which reads `__spec__`), so it defers nothing.
"""

from __future__ import annotations

import importlib.util
import sys
import types

MODULES = ("ssl", "hmac", "bz2", "lzma", "tempfile", "idna")


class _Deferred(types.ModuleType):
    """A module whose code runs when an attribute it lacks is first read."""

    def __getattr__(self, name: str) -> object:
        spec = self.__spec__
        # From here on this is a plain module: lookups during and after the
        # load find its attributes directly.
        self.__class__ = types.ModuleType  # type: ignore[assignment]
        assert spec is not None and spec.loader is not None
        try:
            spec.loader.exec_module(self)
        except BaseException:
            sys.modules.pop(spec.name, None)
            raise
        return getattr(self, name)


def defer(names: tuple[str, ...] = MODULES) -> None:
    """Put a load-on-first-use placeholder in `sys.modules` for each of `names` not yet imported."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            continue
        module = importlib.util.module_from_spec(spec)
        module.__class__ = _Deferred
        sys.modules[name] = module
