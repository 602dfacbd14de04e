"""The models one API process serves, loaded once (at startup, or in a Ray Serve replica's constructor)."""

from __future__ import annotations

import logging
import threading
import time

import torch

from core import threads
from core.models import Classifier, WeightsError, load_model
from core.tasks import TASKS, get_task

from api.errors import ApiError

logger = logging.getLogger(__name__)


class ModelRegistry:
    """Loads the configured models once and hands them out; says which are ready, loading or failed.

    Args:
        keys: Registry keys to serve.
    """

    def __init__(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            get_task(key)  # fails loudly, listing the valid keys
        self.keys = tuple(keys)
        self._models: dict[str, Classifier] = {}
        self._failed: dict[str, str] = {}
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def load(self) -> "ModelRegistry":
        """Load every configured model now (a failure is kept per model and logged, never raised)."""
        threads.configure("serve")
        try:
            for key in self.keys:
                started = time.perf_counter()
                try:
                    classifier = load_model(get_task(key))
                    size = classifier.spec.input_size
                    classifier.runner.logits(torch.zeros(1, 3, size, size))  # first pass allocates; not on a request
                except Exception as exc:  # noqa: BLE001 - one model that cannot load must not keep the others out
                    # the loader's own errors name the file and what is wrong with it; anything else by its type
                    said = exc if isinstance(exc, (WeightsError, ValueError, OSError)) else type(exc).__name__
                    logger.error("model %s failed to load: %s", key, said)
                    with self._lock:
                        self._failed[key] = type(exc).__name__
                    continue
                with self._lock:
                    self._models[key] = classifier
                logger.info("model %s loaded in %.1f s", key, time.perf_counter() - started)
        finally:
            self._done.set()
        return self

    def start(self) -> None:
        """Load in a background thread (the server answers /healthz meanwhile; /readyz says when done)."""
        if self._thread is None and not self._done.is_set():
            self._thread = threading.Thread(target=self.load, name="model-loader", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading has finished; True if it has."""
        return self._done.wait(timeout)

    @property
    def loaded(self) -> bool:
        """Whether loading has finished (successfully or not)."""
        return self._done.is_set()

    def status(self) -> dict[str, str]:
        """{key: "ready" | "loading" | "failed"} for every configured model."""
        with self._lock:
            return {key: "ready" if key in self._models else "failed" if key in self._failed
                    else "failed" if self._done.is_set() else "loading" for key in self.keys}

    @property
    def ready(self) -> bool:
        """Every configured model loaded."""
        return all(state == "ready" for state in self.status().values())

    def loaded_model(self, key: str) -> Classifier | None:
        """The model if it is loaded, else None."""
        with self._lock:
            return self._models.get(key)

    def get(self, key: str) -> Classifier:
        """The loaded model for a key.

        Raises:
            ApiError: 404 for a key this process does not serve (the reason lists those it does),
                503 while it loads or after it failed to load.
        """
        if key not in self.keys:
            served = ", ".join(self.keys)
            known = "" if key in TASKS else "unknown model; "
            raise ApiError(404, "unknown_model", f"No model {key!r} here ({known}this server serves: {served}).")
        classifier = self.loaded_model(key)
        if classifier is not None:
            return classifier
        if self.status()[key] == "loading":
            raise ApiError(503, "not_ready", f"The model {key} is still loading; retry in a few seconds.",
                           headers={"Retry-After": "5"})
        raise ApiError(503, "not_ready", f"The model {key} failed to load on this server; see its log.")
