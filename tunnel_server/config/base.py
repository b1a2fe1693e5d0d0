"""Config models every listener shares: where it listens and its TLS."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ..schema import StrictModel


class ListenConfig(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)


class TlsConfig(StrictModel):
    """TLS for the relay listener. ``self_signed`` (development only) writes a new self-signed
    certificate for localhost/127.0.0.1/::1 to ``cert_file``/``key_file`` when they are missing."""

    cert_file: Path
    key_file: Path
    self_signed: bool = False
    # Optional mTLS: client (device) certificates verified against this CA become device.*
    # attributes for policy; with require_device_cert a client without one is refused.
    device_ca: Path | None = None
    require_device_cert: bool = False

    @model_validator(mode="after")
    def _device(self) -> TlsConfig:
        if self.require_device_cert and self.device_ca is None:
            raise ValueError("require_device_cert needs device_ca")
        return self
