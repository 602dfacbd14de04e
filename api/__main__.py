"""`python -m api`: serve the HTTP API with uvicorn.

Usage:
    python -m api                                  # 127.0.0.1:8000, one worker, every model
    python -m api --host 0.0.0.0 --port 8000 --workers 2
    SECONDLOOK_API_TOKEN=secret SECONDLOOK_API_MODELS=brain_mri,head_ct python -m api

Docs at http://127.0.0.1:8000/docs. Settings come from the environment (`api.settings`); the
thread policy from `core.threads`. With N workers, each worker is a process that loads the models
once and, unless `SECONDLOOK_THREADS` says otherwise, runs on its share of the cores (cores / N
threads), so the workers do not fight over them; `/metrics` then adds up every worker's figures.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import sys
import tempfile

from pydantic import ValidationError

from core.threads import ENV_THREADS, available_cores


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m api", description="Serve the SecondLook HTTP API (uvicorn).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, each with its own models (default 1)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def log_config(level: str) -> dict:
    """uvicorn's logging, with the project's loggers (api, core) on the same handler."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for name in ("api", "core"):
        config["loggers"][name] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    from api.settings import ApiSettings

    try:
        ApiSettings()  # wrong settings stop here, with the reason, not in every worker
    except ValidationError as exc:
        parser.exit(2, f"error: invalid SECONDLOOK_API_* settings:\n{exc}\n")
    if args.workers > 1:
        os.environ.setdefault(ENV_THREADS, str(max(1, available_cores() // args.workers)))
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            folder = tempfile.mkdtemp(prefix="secondlook-metrics-")  # counters only: no upload ever goes there
            atexit.register(shutil.rmtree, folder, True)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    import uvicorn

    uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level, log_config=log_config(args.log_level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
