"""Errors as JSON with a reason a person can read, and a JSON response that never fails on NaN.

Every error body has `error` (a short code for machines) and `reason` (a sentence for people);
a refused upload also carries the `core.predict` row fields (file, status, guard, ...).

| status | error | when |
|---|---|---|
| 400 | `bad_file` | the file is damaged, empty or not a medical image slice |
| 400 | `bad_request` | a wrong parameter (the reason lists the valid choices), a malformed body |
| 401 | `unauthorized` | no valid bearer token where `SECONDLOOK_API_TOKEN` is set |
| 404 | `unknown_model`, `not_found`, `not_available` | no such model, path, or feature in this version |
| 413 | `too_large` | the request or the file is over the byte limit, or the image over the pixel limit |
| 415 | `unsupported_type` | a format or pixel encoding this app does not open, or a body that carries no file |
| 422 | `out_of_range` | a scan the wrong-input guard refuses for this model (its reason) |
| 429 | `over_capacity` | more uploads in progress than the concurrency limit |
| 500 | `internal_error` | a failure here (only the error's type is named) |
| 503 | `not_ready` | the model is still loading, or failed to load |
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An answer other than 200, with its JSON body.

    Attributes:
        status: HTTP status code.
        error: Short code (see the module's table).
        reason: A sentence for people.
        body: Further fields of the body (e.g. the refused file's row).
        headers: Extra response headers (WWW-Authenticate, Retry-After).
    """

    def __init__(self, status: int, error: str, reason: str, body: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason
        self.body = body or {}
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return SafeJSONResponse({**self.body, "error": self.error, "reason": self.reason}, status_code=self.status,
                                headers=self.headers)


def finite(value: Any) -> Any:
    """The value with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


class SafeJSONResponse(JSONResponse):
    """JSON with undefined numbers written as null, never a 500 for a NaN in a card or a score."""

    def render(self, content: Any) -> bytes:
        return json.dumps(finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
