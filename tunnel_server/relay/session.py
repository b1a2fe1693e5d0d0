"""A relay tunnel's server-side state: it outlives its WebSockets, until it finishes or its
resume window ends."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from tunnel_protocol import Tunnel
from tunnel_protocol.aio.pump import Pump
from tunnel_protocol.aio.stream import TcpStream

from ..access.device import Device
from ..access.identity import Identity
from .limits import SessionLimits


@dataclass
class Session:
    """One tunnel. ``pump`` is its current attachment (None while parked)."""

    sid: str
    identity: Identity
    tunnel: Tunnel
    stream: TcpStream
    resource: str
    address: str
    port: int
    source_ip: str | None
    created: float = field(default_factory=time.monotonic)
    pump: Pump | None = None
    detached: asyncio.Event = field(default_factory=asyncio.Event)
    renewed: asyncio.Event = field(default_factory=asyncio.Event)  # replaced on each renewal
    expiry: asyncio.TimerHandle | None = None
    resumes: int = 0
    device: Device | None = None  # from the client certificate at connect (mTLS)
    host: str | None = None  # destination host as requested (destination-group form)
    # Loop time of the last DATA or EOF either way, as of the last detach (the pump tracks it
    # while attached); the idle timeout counts from it.
    last_activity: float = 0.0
    limits: SessionLimits | None = None  # idle timeout and maximum duration, when configured

    @property
    def activity(self) -> float:
        """Loop time of the last DATA or EOF either way, attached or parked."""
        return self.pump.last_activity if self.pump is not None else self.last_activity

    def renew(self, identity: Identity) -> None:
        """A fresh credential for the same principal: watchers waiting on ``renewed`` wake."""
        self.identity = identity
        self.renewed.set()
        self.renewed = asyncio.Event()


async def wait_event(event: asyncio.Event, delay: float) -> bool:
    """True if ``event`` is set within ``delay`` seconds, False when the delay runs out."""
    if delay <= 0:
        return event.is_set()
    try:
        async with asyncio.timeout(delay):
            await event.wait()
    except TimeoutError:
        return False
    return True
