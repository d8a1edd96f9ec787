"""The web page at `/` (static files in `static/`, no build step): it talks to `/v1/realtime`."""
from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).parent / "static"


def routes(ctx) -> list:
    """`/` and `/static/*` for the server's app (funaudiochat.serve.app.ROUTE_MODULES)."""
    from starlette.responses import FileResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def page(request):
        return FileResponse(STATIC / "index.html")

    return [Route("/", page, methods=["GET"]), Mount("/static", StaticFiles(directory=STATIC), name="static")]
