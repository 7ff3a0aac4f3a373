"""python3 -m maga_transformer.start_server: the HTTP server, configured by environment variables."""
from __future__ import annotations

import logging
import os
import sys


def main() -> int:
    level = os.environ.get("PY_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from maga_transformer.config.server_config import ServerConfig
        from maga_transformer.model_factory import ModelFactory
        from maga_transformer.server.app import create_app
        server_config = ServerConfig.from_env()
        model = ModelFactory.create_from_env()
    except ValueError as err:  # a bad environment variable: say which, do not start
        logging.getLogger("maga_transformer").error("cannot start: %s", err)
        return 2
    app = create_app(model, server_config)
    uvicorn.run(app, host=server_config.host, port=server_config.port, log_level=level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
