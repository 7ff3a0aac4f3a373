"""Server settings from the seed's environment variables, read once at start-up."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8088  # START_PORT
    concurrency_limit: int = 32  # CONCURRENCY_LIMIT: above it a request is rejected at once
    api_key: Optional[str] = None  # checked as a Bearer token when set
    model_name: str = "default"  # the id /v1/models reports

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"START_PORT: {self.port} is not a TCP port")
        if self.concurrency_limit <= 0:
            raise ValueError(f"CONCURRENCY_LIMIT must be positive, got {self.concurrency_limit}")

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "ServerConfig":
        env = os.environ if env is None else env

        def integer(name: str, default: int) -> int:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}: expected an integer, got {raw!r}") from None

        return cls(host=env.get("HOST") or "0.0.0.0", port=integer("START_PORT", 8088),
                   concurrency_limit=integer("CONCURRENCY_LIMIT", 32), api_key=env.get("API_KEY") or None,
                   model_name=env.get("MODEL_NAME") or os.path.basename(env.get("CHECKPOINT_PATH", "").rstrip("/"))
                   or "default")
