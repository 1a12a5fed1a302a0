"""Where the dashboard listens and who may read it: ``[monitor]`` of cloud.toml, ``--visible*`` of simulate."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

DEFAULT_PORT = 8097  # the seed's visdom port
TOKEN_ENV = "FEDCMD_MONITOR_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MonitorConfig(BaseModel):
    """The read-only dashboard (``/``), its event stream (``/events``) and Prometheus (``/metrics``).

    Loopback by default. Any other address needs a token (``token``, ``token_file`` or the environment
    variable FEDCMD_MONITOR_TOKEN): the page and every endpoint then answer only requests that carry it, as
    ``?token=...`` or ``Authorization: Bearer ...`` (Prometheus: ``authorization: {credentials: ...}``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = DEFAULT_PORT  # 0: any free port
    token: str | None = Field(None, min_length=16, max_length=256)
    token_file: Path | None = None
    tensorboard: Path | None = None  # also write per-round scalars for TensorBoard here

    @model_validator(mode="after")
    def _token_off_loopback(self) -> MonitorConfig:
        if self.token is None and self.token_file is not None:
            try:
                text = self.token_file.read_text().strip()
            except OSError as e:
                raise ValueError(f"token_file {self.token_file}: {e.strerror or e}") from None
            if not 16 <= len(text) <= 256:
                raise ValueError(f"token_file {self.token_file}: the token must be 16 to 256 characters")
            self.token = text
        if self.token is None and os.environ.get(TOKEN_ENV):
            self.token = os.environ[TOKEN_ENV].strip() or None
        if self.enabled and not is_loopback(self.host) and not self.token:
            raise ValueError(
                f"host {self.host!r} is not a loopback address: the dashboard would be readable from the "
                f"network, so it needs a token (token_file, or {TOKEN_ENV}) of at least 16 characters"
            )
        return self
