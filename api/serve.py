"""The API as a Ray Serve deployment: the same FastAPI app, one copy per replica.

    serve run api/serve.yaml                                   # local Ray; replicas, CPUs, autoscaling in the file
    serve run api.serve:build replicas=2 cpus=1 models=brain_mri

Each replica is a process that loads the models once, in its constructor (Ray sends it requests
only after that), applies the thread policy (`core.threads`) with as many intra-op threads as the
CPUs Ray gave it, and names itself in the `X-SecondLook-Replica` response header. Scaling
(`autoscaling_config`: on the number of requests each replica has in progress or queued) and the
CPUs per replica are set in api/serve.yaml or by `build`'s arguments; docs/api.md says what
changes on a multi-node cluster.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from core import threads

from ray import serve
from ray.serve import Application

from api.app import create_app
from api.registry import ModelRegistry
from api.settings import ApiSettings

logger = logging.getLogger(__name__)

DEPLOYMENT = "SecondLook"


def assigned_cpus() -> int:
    """Whole CPUs Ray gave this replica (at least 1)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
@serve.ingress()
class SecondLook:
    """One replica: the models loaded once, then the FastAPI app of `api.app` built around them.

    Args:
        models: Registry keys to serve (default: `SECONDLOOK_API_MODELS`, else every model).
    """

    def __init__(self, models: tuple[str, ...] | None = None) -> None:
        # intra-op threads follow the CPUs Ray reserved for this replica, unless the user set them
        os.environ.setdefault(threads.ENV_THREADS, str(assigned_cpus()))
        self.settings = ApiSettings(models=models) if models else ApiSettings()
        self.name = serve.get_replica_context().replica_id.unique_id
        self.registry = ModelRegistry(self.settings.models).load()
        failed = [key for key, state in self.registry.status().items() if state != "ready"]
        if failed:
            logger.error("replica %s: models not loaded: %s", self.name, ", ".join(failed))
        logger.info("replica %s ready: %s, policy %s", self.name, ", ".join(self.settings.models), threads.policy())

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.settings, self.registry, replica=lambda: self.name)


def build(args: dict[str, str]) -> Application:
    """The application for `serve run api.serve:build key=value ...` or a config file's `import_path`.

    Args:
        args: Optional "models" (comma-separated keys), "replicas" (a fixed number; default: the
            config's autoscaling or 1) and "cpus" (per replica).

    Raises:
        ValueError: For an unknown argument or model, or a count that is not a positive whole number.
    """
    known = {"models", "replicas", "cpus"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; one of {', '.join(sorted(known))}")
    options: dict[str, Any] = {}
    for name in ("replicas", "cpus"):
        if name in args:
            try:
                value = int(args[name])
            except ValueError:
                raise ValueError(f"{name} must be a whole number, got {args[name]!r}") from None
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
            options["num_replicas" if name == "replicas" else "ray_actor_options"] = (
                value if name == "replicas" else {"num_cpus": value})
    models = tuple(k.strip() for k in str(args.get("models", "")).split(",") if k.strip()) or None
    if models is not None:
        ApiSettings(models=models)  # an unknown key fails here, listing the valid ones
    deployment = SecondLook.options(**options) if options else SecondLook
    return deployment.bind(models)
