"""Import paths of the flat layout before the relay was split into packages, kept importable
for one release: importing one warns (DeprecationWarning) and gives a module carrying the names
of the module(s) that hold the code now."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

# old module -> the module(s) its names live in now. A package entry covers its submodules.
MOVED: dict[str, tuple[str, ...]] = {
    "tunnel_server.identity": ("tunnel_server.access.identity",),
    "tunnel_server.policy": ("tunnel_server.access.policy",),
    "tunnel_server.inventory": ("tunnel_server.access.inventory",),
    "tunnel_server.device": ("tunnel_server.access.device",),
    "tunnel_server.destinations": ("tunnel_server.access.addresses", "tunnel_server.relay.dialer"),
    "tunnel_server.http_proxy": ("tunnel_server.web",),
    "tunnel_server.http_proxy.config": ("tunnel_server.config.http",),
    "tunnel_server.handshake": ("tunnel_server.relay.handshake",),
    "tunnel_server.control": ("tunnel_server.relay.continuous",),
    "tunnel_server.limits": ("tunnel_server.relay.limits", "tunnel_server.relay.connection"),
    "tunnel_server.cluster": ("tunnel_server.relay.cluster",),
    "tunnel_server.forward": ("tunnel_server.relay.forwarding",),
    "tunnel_server.session": ("tunnel_server.relay.session",),
    "tunnel_server.admin": ("tunnel_server.ops.admin", "tunnel_server.access.revocations"),
    "tunnel_server.metrics": ("tunnel_server.ops.metrics",),
    "tunnel_server.listeners": ("tunnel_server.ops.listeners",),
    "tunnel_server.tls": ("tunnel_server.ops.tls",),
}
# Packages whose submodules moved with them (tunnel_server.identity.jwt_verifier, ...).
_PACKAGES = ("tunnel_server.identity", "tunnel_server.policy", "tunnel_server.http_proxy")


def targets(fullname: str) -> tuple[str, ...] | None:
    """Where an old module's names live now, or None for a name that did not move."""
    if fullname in MOVED:
        return MOVED[fullname]
    for package in _PACKAGES:
        if fullname.startswith(package + "."):
            new = MOVED[package][0] + fullname[len(package) :]
            return (new,)
    return None


class _Aliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if targets(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in _PACKAGES)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = targets(spec.name) or ()
        warnings.warn(
            f"{spec.name} moved to {' and '.join(new)}; the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        # A new module carrying the same objects (not the new module itself: the import system
        # would overwrite its __spec__ with this alias's).
        modules = [importlib.import_module(name) for name in new]
        merged = types.ModuleType(spec.name, modules[0].__doc__)
        for module in modules:
            for name, value in vars(module).items():
                if not name.startswith("__"):
                    setattr(merged, name, value)
        return merged

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module was imported from its new home."""


def install() -> None:
    if not any(isinstance(finder, _Aliases) for finder in sys.meta_path):
        sys.meta_path.append(_Aliases())
