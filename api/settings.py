"""The API's settings, from the environment (pydantic-settings), read once per process.

| variable | default | meaning |
|---|---|---|
| `SECONDLOOK_API_TOKEN` | unset | bearer token every `/v1` request and `/metrics` must carry; unset: no token asked |
| `SECONDLOOK_API_MODELS` | every registry key | the models this process loads and serves, comma-separated |
| `SECONDLOOK_API_MAX_REQUEST_BYTES` | 201 MB | largest request body; bigger ones get 413 before they are read |
| `SECONDLOOK_API_MAX_CONCURRENT_REQUESTS` | 32 | uploads in progress at once (running or waiting for a core); more get 429 |
| `SECONDLOOK_API_CORS_ORIGINS` | empty (CORS off) | browser origins allowed to call the API, comma-separated |

The file limits themselves (200 MB per file, 40 million pixels per image) are the app's, from
`core.imaging`; the thread policy (`SECONDLOOK_THREADS`, `SECONDLOOK_CONCURRENCY`) is `core.threads`'.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.imaging import MAX_UPLOAD_BYTES
from core.tasks import TASKS

# A multipart body carries the file plus its boundaries and part headers: a few hundred bytes.
MULTIPART_ALLOWANCE = 2**20


class ApiSettings(BaseSettings):
    """Settings of one API process; each field reads `SECONDLOOK_API_<FIELD>` from the environment."""

    model_config = SettingsConfigDict(env_prefix="SECONDLOOK_API_", extra="ignore")

    token: SecretStr | None = Field(None, description="bearer token required on /v1 and /metrics (unset: none)")
    models: Annotated[tuple[str, ...], NoDecode] = Field(tuple(TASKS), description="registry keys to load and serve")
    max_request_bytes: int = Field(MAX_UPLOAD_BYTES + MULTIPART_ALLOWANCE, gt=0, description="largest request body")
    max_concurrent_requests: int = Field(32, ge=1, description="uploads in progress at once; more get 429")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field((), description="allowed browser origins (empty: CORS off)")

    @field_validator("models", "cors_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("models")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [key for key in value if key not in TASKS]
        if unknown:
            raise ValueError(f"unknown models {unknown}; one of {', '.join(TASKS)}")
        if not value:
            raise ValueError(f"no model to serve; name one or more of {', '.join(TASKS)}")
        return tuple(dict.fromkeys(value))

    @field_validator("token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value
