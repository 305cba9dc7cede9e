"""API errors in the OpenAI shape, mapped to HTTP status in one middleware."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from models.engine import EngineUnavailable
from models.errors import GenerationError
from transport.errors import TransportError

log = logging.getLogger("edge_llm.http")


class ApiError(Exception):
    """A client-visible error: status, OpenAI error type, message, offending parameter."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: ApiError) -> web.Response:
    return web.json_response(error_body(err), status=err.status, headers=err.headers)


def as_api_error(e: Exception) -> ApiError:
    """Domain errors -> API errors; anything unknown is a logged 500 without a traceback."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, GenerationError):
        return ApiError(400, str(e), param="prompt")
    if isinstance(e, TimeoutError):
        return ApiError(504, "the request timed out before it finished", "timeout", code="timeout")
    if isinstance(e, EngineUnavailable | TransportError):
        return ApiError(503, f"the edge cluster cannot serve this request: {e}", "service_unavailable",
                        code="worker_unavailable")
    log.exception("internal error")
    return ApiError(500, f"internal error ({type(e).__name__}); see the server log", "internal_error")


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "not_found_error" if e.status == 404 else "invalid_request_error"
        return error_response(ApiError(e.status, f"{e.reason}: {request.method} {request.path}", kind))
    except json.JSONDecodeError as e:
        return error_response(ApiError(400, f"request body is not valid JSON: {e}"))
    except Exception as e:
        return error_response(as_api_error(e))
