"""The one error type for bad wire input: an HTTP status, a stable code, and a clear message."""

from __future__ import annotations

from typing import Any


class WireError(Exception):
    """Bad input from a peer. Routes turn it into a 4xx JSON answer; state is never touched."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.message, **self.extra}


def validation_problems(errors: list[dict[str, Any]], where: str) -> str:
    """Each problem of a pydantic validation as `loc: message` (`query.since: Input should be
    ...`), joined by '; '; `where` names a problem without a location."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or where}: {error['msg']}"
        for error in errors
    )


def invalid_request(errors: list[dict[str, Any]], where: str = "body") -> WireError:
    """422 `invalid_request` naming each problem of a pydantic validation."""
    return WireError(422, "invalid_request", validation_problems(errors, where)[:2000])
