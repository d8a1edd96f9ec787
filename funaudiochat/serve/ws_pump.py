"""The socket side of a WebSocket session, shared by `/v1/realtime` and `/api/chat`.

A session object has `on_text(str)`, `on_binary(bytes)`, a bounded `outbox` (asyncio.Queue) of outgoing messages,
a `closed` event it sets when it must end (a client that does not read), and `close()`. `pump` feeds it what
arrives, sends what it queues, and ends it when the client goes (or stops reading for SEND_TIMEOUT_S).
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0  # a send that does not complete in this time means the client stopped reading


async def _send_loop(websocket, session, send) -> None:
    try:
        while True:
            message = await session.outbox.get()
            await asyncio.wait_for(send(message), SEND_TIMEOUT_S)
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001 - a gone or stuck client ends its session, nothing else
        log.info("%s: sending failed (%s); closing", websocket.url.path, type(err).__name__)
        session.closed.set()


async def pump(websocket, session, send) -> None:
    """Run an accepted Starlette WebSocket with `session` until either side ends; `send(message)` sends one."""
    sender = asyncio.create_task(_send_loop(websocket, session, send))
    closed = asyncio.create_task(session.closed.wait())
    try:
        while True:
            receive = asyncio.create_task(websocket.receive())
            done, _ = await asyncio.wait({receive, closed}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:  # the session ended itself
                receive.cancel()
                break
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("text") is not None:
                await session.on_text(message["text"])
            elif message.get("bytes") is not None:
                await session.on_binary(message["bytes"])
    except Exception as err:  # noqa: BLE001 - a broken connection ends this session only
        log.info("%s: connection ended (%s)", websocket.url.path, type(err).__name__)
    finally:
        await session.close()
        for task in (closed, sender):
            task.cancel()
        await asyncio.gather(sender, closed, return_exceptions=True)
        try:
            await websocket.close(code=1008 if session.outbox.full() else 1000)
        except Exception:  # noqa: BLE001 - already closed by the client
            pass
