"""A real webhook for alert tests: an ``http.server`` on 127.0.0.1 in a thread that keeps the
JSON bodies POSTed to it, so an alert is checked as a chat or paging service would get it.
The ``webhook`` fixture (conftest) starts one and points ``RECSYS_ALERT_WEBHOOK`` at it."""

from __future__ import annotations

import http.server
import json
import queue
import threading
from typing import Any


class Receiver:
    """Collects the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.put(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def next(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return self.received.get(timeout=timeout_s)

    def all(self) -> list[dict[str, Any]]:
        items = []
        while not self.received.empty():
            items.append(self.received.get_nowait())
        return items
