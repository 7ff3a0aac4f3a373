"""Server settings from the seed's environment variables, read once at start-up."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from maga_transformer.config.engine_config import env_bool, env_int

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8088  # START_PORT
    concurrency_limit: int = 32  # CONCURRENCY_LIMIT: above it a request is rejected at once
    api_key: Optional[str] = None  # checked as a Bearer token when set
    model_name: str = "default"  # the id /v1/models reports
    log_to_terminal: bool = False  # FT_SERVER_TEST=1; else logs go to files under log_dir
    log_dir: str = "logs"  # LOG_PATH
    log_level: str = "WARNING"  # PY_LOG_LEVEL
    graceful_shutdown_s: int = 30  # GRACEFUL_SHUTDOWN_TIMEOUT: how long SIGTERM waits for in-flight requests

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"START_PORT: {self.port} is not a TCP port")
        if self.concurrency_limit <= 0:
            raise ValueError(f"CONCURRENCY_LIMIT must be positive, got {self.concurrency_limit}")
        if self.graceful_shutdown_s < 0:
            raise ValueError(f"GRACEFUL_SHUTDOWN_TIMEOUT must be >= 0, got {self.graceful_shutdown_s}")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise ValueError(f"PY_LOG_LEVEL: expected one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}")
        self.log_level = self.log_level.upper()

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "ServerConfig":
        env = os.environ if env is None else env
        return cls(host=env.get("HOST") or "0.0.0.0", port=env_int(env, "START_PORT", 8088),
                   concurrency_limit=env_int(env, "CONCURRENCY_LIMIT", 32), api_key=env.get("API_KEY") or None,
                   model_name=env.get("MODEL_NAME") or os.path.basename(env.get("CHECKPOINT_PATH", "").rstrip("/"))
                   or "default",
                   log_to_terminal=env_bool(env, "FT_SERVER_TEST", False), log_dir=env.get("LOG_PATH") or "logs",
                   log_level=env.get("PY_LOG_LEVEL") or "WARNING",
                   graceful_shutdown_s=env_int(env, "GRACEFUL_SHUTDOWN_TIMEOUT", 30))
