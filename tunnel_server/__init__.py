"""The relay server: it authenticates each tunnel, authorizes it, forwards its TCP stream to the
private target, and serves HTTP mode for web apps.

Packages, from the top of the import layers down (import-linter keeps each one from importing a
higher one, and no two modules import each other):

- ``cli``, ``serve``, ``app``: the command line, the running process, the composition root;
- ``ops``: the admin API, metrics, logs, TLS contexts, listener helpers;
- ``relay``: the WebSocket endpoint and the tunnel lifecycle; ``web``: HTTP mode;
- ``config``: the YAML configuration;
- ``access``: identity, policy, addresses, inventory, devices, revocations; ``state``: the state
  shared between nodes;
- ``audit``, ``schema``: the audit log and what every config-shaped input shares.
"""

from . import _moved

_moved.install()
