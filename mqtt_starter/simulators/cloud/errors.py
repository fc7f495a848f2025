"""Qlik's error answer, as the simulated tenant raises it: `{"errors": [{code, title, detail}]}`."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An answer in Qlik's error shape: {"errors": [{"code", "title", "detail"}]}."""

    def __init__(
        self, status: int, code: str, title: str, detail: str = "", retry_after: int | None = None
    ) -> None:
        super().__init__(title)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"errors": [{"code": self.code, "title": self.title, "detail": self.detail}]}
