"""Moved to ``tunnel_runtime.wsbridge`` (the process runtime is not part of the protocol core);
this path goes in the next release."""

from __future__ import annotations

import importlib
import warnings

_NEW = "tunnel_runtime.wsbridge"
warnings.warn(
    f"tunnel_protocol.aio.wsbridge moved to {_NEW}; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
# Imported by name, not statically: the protocol core does not depend on the runtime.
globals().update({k: v for k, v in vars(importlib.import_module(_NEW)).items() if k[:2] != "__"})
