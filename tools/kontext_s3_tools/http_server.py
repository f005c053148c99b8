"""The local stand-ins' HTTP server: a peer that hangs up mid-request is normal here, not a traceback."""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer
from typing import Any


class QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller that gave up (fal's webhook timeout, a stack stopping under a request) resets the connection;
        # the work done stands, as on the real services. Anything else is still printed.
        if isinstance(sys.exc_info()[1], ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
            return
        super().handle_error(request, client_address)
