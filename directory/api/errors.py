"""Matrix-style JSON errors: {"errcode", "error"} with the right HTTP status."""

from __future__ import annotations

from starlette.responses import JSONResponse


class MatrixError(Exception):
    def __init__(
        self,
        status: int,
        errcode: str,
        message: str,
        headers: dict[str, str] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"errcode": self.errcode, "error": self.message, **self.extra},
            status_code=self.status,
            headers=self.headers,
        )
