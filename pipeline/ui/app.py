"""The web view's HTTP side: a Starlette app serving the page, its JSON actions, key frames and live events.

Pages get live events over server-sent events (``/api/events``): first a snapshot of the view, then each change as
it is read from the bus. Actions go to the bus through the Python client (queries on the compacted queries topic,
searches over the search request and reply topics), never to the workers directly, so the view scales and
restarts like any other Kafka client. Actions accept JSON bodies only: a form on another site cannot post one
without the browser asking this server first (CORS), which it never allows. Bound to loopback, it also accepts
only loopback host names, so a DNS-rebinding page cannot reach it either.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.bus.records import InvalidQuery
from pipeline.ui.view import Event, LiveView

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]  # the host names of an IPv4 loopback bind (Starlette cannot check [::1])
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
PENDING_EVENTS = 1000  # events queued for one page; a page that far behind is dropped and reconnects


class Page:
    """One open page's pending events; ``dropped`` once it fell ``PENDING_EVENTS`` behind."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(PENDING_EVENTS)
        self.dropped = False


class Hub:
    """Fans events out from the consumer thread to every open page on the server's event loop."""

    def __init__(self) -> None:
        self._pages: set[Page] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def join(self) -> Page:
        self._loop = asyncio.get_running_loop()
        page = Page()
        self._pages.add(page)
        return page

    def leave(self, page: Page) -> None:
        self._pages.discard(page)

    def close(self) -> None:
        """End every page's event stream (at shutdown, so the server need not wait for them); on the event loop."""
        for page in list(self._pages):
            page.dropped = True
            try:
                page.queue.put_nowait(None)  # wakes the stream
            except asyncio.QueueFull:
                pass

    def publish(self, events: list[Event]) -> None:
        """From any thread."""
        if events and self._loop is not None and self._pages:
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[Event]) -> None:
        for page in list(self._pages):
            try:
                for event in events:
                    page.queue.put_nowait(event)
            except asyncio.QueueFull:  # its stream ends; the browser's EventSource reconnects to a fresh snapshot
                page.dropped = True
                self._pages.discard(page)


class UiServer(uvicorn.Server):
    """Ends the pages' event streams when told to exit: open streams would hold up the graceful shutdown."""

    def __init__(self, config: uvicorn.Config, hub: Hub) -> None:
        super().__init__(config)
        self.hub = hub

    def handle_exit(self, sig, frame) -> None:
        self.hub.close()
        super().handle_exit(sig, frame)


def create_app(view: LiveView, hub: Hub, client, heartbeat, loopback_only: bool = True) -> Starlette:
    """``client`` is a :class:`pipeline.client.Client`; ``heartbeat`` the consumer loop's (``/healthz``)."""

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def events(request: Request) -> Response:
        joined = hub.join()

        async def stream():
            try:
                yield _sse(view.snapshot())
                while not joined.dropped:
                    try:
                        event = await asyncio.wait_for(joined.queue.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if event is not None:
                        yield _sse(event)
            finally:
                hub.leave(joined)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def add_query(request: Request) -> Response:
        body = await _json_body(request)
        text, threshold = body.get("text"), body.get("threshold")
        if not isinstance(text, str) or (threshold is not None and (type(threshold) is not int or threshold < 0)):
            return JSONResponse({"error": "send {\"text\": string, \"threshold\": integer or null}"}, 400)
        try:
            query_id = await run_in_threadpool(client.add_query, text, threshold=threshold)
        except InvalidQuery as e:
            return JSONResponse({"error": str(e)}, 400)
        log.info("query added", extra={"fields": {"query": query_id}})
        return JSONResponse({"query_id": query_id}, 201)

    async def remove_query(request: Request) -> Response:
        query_id = request.path_params["query_id"]
        await run_in_threadpool(client.remove_query, query_id)
        log.info("query removed", extra={"fields": {"query": query_id}})
        return Response(status_code=204)

    async def search(request: Request) -> Response:
        body = await _json_body(request)
        text, top_k = body.get("text"), body.get("top_k", 10)
        if not isinstance(text, str) or type(top_k) is not int:
            return JSONResponse({"error": "send {\"text\": string, \"top_k\": integer}"}, 400)
        try:
            hits = await run_in_threadpool(client.search, text, top_k=top_k)
        except (InvalidQuery, ValueError) as e:
            return JSONResponse({"error": str(e)}, 400)
        return JSONResponse({"hits": [{**h, "frames": view.strip(h["stream_id"], h["start"], h["end"])}
                                      for h in hits]})

    async def keyframe(request: Request) -> Response:
        jpeg = view.keyframe(request.path_params["stream_id"], request.path_params["t"])
        if jpeg is None:
            return Response("no such key frame held", 404, media_type="text/plain")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=60"})

    async def healthz(request: Request) -> Response:
        status, body = heartbeat.report()
        return Response(body, status, media_type="application/json")

    routes = [
        Route("/", page),
        Route("/api/events", events),
        Route("/api/queries", add_query, methods=["POST"]),
        Route("/api/queries/{query_id:path}", remove_query, methods=["DELETE"]),
        Route("/api/search", search, methods=["POST"]),
        Route("/keyframes/{stream_id:str}/{t:int}", keyframe),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)] if loopback_only else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={_NotJson: _not_json})


class _NotJson(Exception):
    pass


async def _json_body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise _NotJson("actions take application/json bodies")
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise _NotJson(f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise _NotJson("the body must be a JSON object")
    return body


async def _not_json(request: Request, error: Exception) -> Response:
    return JSONResponse({"error": str(error)}, 415)


def _sse(event: Event) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"
