"""SecondLook's HTTP API: FastAPI served by uvicorn (`python -m api`) or by Ray Serve (`api.serve`).

The same pipeline, models and decisions as the app (`core.pipeline`); see `api.app` for the
endpoints, `api.settings` for the settings and docs/api.md for how to run and call it.
"""

import core  # noqa: F401 - first: core sets OpenMP's wait policy before anything here imports torch
