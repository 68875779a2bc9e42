"""The annotation app served from a background thread of this process, and binding its port.

``rlhfkit pipeline`` with ``rounds:`` starts one :class:`AppServer` on its own database: it
pushes each round's generation sets (``POST /api/sets``) and people, or a simulated team
(:mod:`rlhfkit.annotate.team`), rank them over HTTP while the pipeline waits. The server
generates nothing (:class:`PushedSetsOnly`): ``/api/next`` serves the pushed sets and answers
``empty`` while none waits.

    with AppServer(store, k=4, port=0) as server:
        client = AppClient(server.url, admin_token)

:func:`bind_port` is also what ``rlhfkit annotate`` binds with, before its model loads.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from rlhfkit.errors import UserError

if TYPE_CHECKING:
    from rlhfkit.annotate.store import AnnotationStore


# Straight to the loopback server, whatever http_proxy says.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def bind_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the server to listen on.

    Bound before the model loads, so a busy port is reported at once rather than after
    minutes of loading, and no other process can take it in between. It listens at once too:
    a client that connects before the server's loop runs waits in the backlog instead of
    being refused.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is already in use (is another server running?); stop it or "
                f"choose a free port with --port, e.g. --port {port + 1 if port < 65535 else port - 1}"
            ) from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port") from None
    sock.listen(2048)  # uvicorn's backlog
    return sock


class PushedSetsOnly:
    """The generator of an app that serves only pushed sets: it never generates.

    The app built with ``pushed_only=True`` never calls it; a call is a bug, and says so.
    """

    name = "pipeline"

    def generate(self, prompt: str, k: int) -> list[str]:
        raise RuntimeError(
            "this annotation app serves only the generation sets pushed to POST /api/sets and generates no "
            "responses; push the set, or start 'rlhfkit annotate --policy ...' to generate"
        )


class AppServer:
    """The annotation app on ``store``, served by uvicorn from a daemon thread.

    Starts at once: the constructor binds ``host:port`` (0: a free port; a port in use is a
    :class:`~rlhfkit.errors.UserError`) and returns when ``GET /api/health`` answers. The app
    serves only pushed sets (``create_app(..., pushed_only=True)``). ``url`` is
    ``http://host:port``. ``stop()`` (or leaving the ``with`` block) shuts the server down and
    waits for its thread; the store stays open (its owner closes it).
    """

    def __init__(
        self,
        store: AnnotationStore,
        *,
        k: int = 4,
        allow_ties: bool = False,
        overlap: int = 2,
        overlap_share: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = 1024 * 1024,
        start_timeout_s: float = 30.0,
    ):
        import uvicorn

        from rlhfkit.annotate.app import create_app

        app = create_app(
            store,
            PushedSetsOnly(),
            k,
            allow_ties,
            overlap=overlap,
            overlap_share=overlap_share,
            prefetch=0,
            max_body_bytes=max_body_bytes,
            pushed_only=True,
        )
        self._sock = bind_port(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]  # the real one when port=0
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        # uvicorn installs no signal handlers off the main thread, so Ctrl-C still reaches the pipeline.
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="rlhfkit-annotate-app", daemon=True
        )
        self._thread.start()
        try:
            self._wait_healthy(start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._thread.is_alive():
                raise UserError(f"the annotation app at {self.url} stopped while starting; see the log above")
            if self._server.started:
                try:
                    with _NO_PROXY.open(f"{self.url}/api/health", timeout=2) as res:
                        if json.loads(res.read()).get("status") == "ok":
                            return
                except (urllib.error.URLError, OSError, ValueError):
                    pass
            if time.monotonic() > deadline:
                raise UserError(f"the annotation app at {self.url} did not answer /api/health within {timeout_s} s")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the server down (requests in flight finish) and wait for its thread."""
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> AppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
