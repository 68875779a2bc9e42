"""A small HTTP client of the annotation app's JSON API (stdlib ``urllib``, no dependency).

``rlhfkit pipeline`` with ``rounds:`` pushes each round's sets and reads the rankings back
through it, and the simulated team (:mod:`rlhfkit.annotate.team`) ranks through it, so both
talk to the app exactly as a person's browser does.

    client = AppClient("http://127.0.0.1:8904", token)
    client.push_set("Why is the sky blue?", ["Rayleigh scattering.", "It reflects the sea."], round=1, key="r1/0")
    task = client.next_set()  # {"status": "ready", "set_id", "responses", "round", ...} or status "empty"
    client.submit(task["set_id"], [[0], [1]])

Every failure is a :class:`~rlhfkit.errors.UserError` naming the URL: an HTTP error carries the
server's message, a refused connection says to start the app. The only retry: a GET whose
connection was reset or dropped is sent once more after half a second (GETs change nothing).
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rlhfkit.errors import UserError


class AppHTTPError(UserError):
    """The app answered with an HTTP error: ``status`` (e.g. 409) and the app's ``code``
    (e.g. ``already_ranked``); the message holds the method, the URL and the app's message."""

    def __init__(self, message: str, status: int, code: str | None):
        super().__init__(message)
        self.status, self.code = status, code


PER_PAGE = 100  # the app's largest page of rankings
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class AppClient:
    """The annotation app at ``url`` (``http://host:port``), as the user whose ``token`` it is."""

    def __init__(self, url: str, token: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        host = urllib.parse.urlsplit(self.url).hostname
        # A loopback app is reached directly, whatever http_proxy says; others as the environment says.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------ the endpoints

    def health(self) -> dict:
        """``GET /api/health``: ``{"status": "ok"}``."""
        return self._request("GET", "/api/health")

    def me(self) -> dict:
        """``GET /api/me``: ``{"name", "is_admin", "k", "allow_ties", "model", "prompts"}``."""
        return self._request("GET", "/api/me")

    def next_set(self, wait: float = 0.0) -> dict:
        """``GET /api/next``: the next set to rank (``status`` ``ready``), or ``empty`` /
        ``generating`` (poll again)."""
        return self._request("GET", "/api/next", params={"mode": "next", "wait": wait})

    def submit(self, set_id: int, groups: list[list[int]], comment: str = "") -> dict:
        """``POST /api/rankings``: ``groups`` are tie groups of response indices, best first."""
        body = {"set_id": set_id, "ranking": groups, "comment": comment}
        return self._request("POST", "/api/rankings", body=body)

    def skip(self, set_id: int) -> dict:
        """``POST /api/skips``: this user will not be served the set again."""
        return self._request("POST", "/api/skips", body={"set_id": set_id})

    def push_set(
        self,
        prompt: str,
        responses: list[str],
        *,
        round: int | None,
        key: str | None,
        priority: float = 0.0,
        model: str = "pipeline",
    ) -> dict:
        """``POST /api/sets`` (admins): ``{"set_id", "created", "round", "key"}``; the same ``key``
        pushed again with the same content is a no-op (``created`` False)."""
        body = {
            "prompt": prompt,
            "responses": list(responses),
            "round": round,
            "key": key,
            "priority": float(priority),
            "model": model,
        }
        return self._request("POST", "/api/sets", body=body)

    def round_progress(self, round: int) -> dict:
        """``GET /api/rounds/{round}`` (admins): see :meth:`AnnotationStore.round_progress`."""
        return self._request("GET", f"/api/rounds/{round}")

    def rankings(self, round: int | None = None) -> list[dict]:
        """Every live ranking this user may see (an admin: all), newest first, walking every page
        of ``GET /api/rankings``; ``round``: only that round's. A ranking added while the pages
        are walked shifts the later pages, so rows are kept once by id."""
        rows: dict[int, dict] = {}
        page, pages = 1, 1
        while page <= pages:
            params = {"page": page, "per_page": PER_PAGE, "round": round}
            listing = self._request("GET", "/api/rankings", params=params)
            for row in listing["items"]:
                rows.setdefault(row["id"], row)
            pages, page = listing["pages"], page + 1
        return sorted(rows.values(), key=lambda r: r["id"], reverse=True)

    def stats(self) -> dict:
        """``GET /api/stats``: counts and agreement."""
        return self._request("GET", "/api/stats")

    # ------------------------------------------------------------ transport

    def _request(self, method: str, path: str, *, params: dict | None = None, body: Any = None) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        url = f"{self.url}{path}" + (f"?{query}" if query else "")
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        attempts = 2 if method == "GET" else 1
        for attempt in range(attempts):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as e:
                code, message = _server_error(e)
                raise AppHTTPError(f"{method} {url} failed: HTTP {e.code} {message}", e.code, code) from None
            except (ConnectionResetError, http.client.RemoteDisconnected) as e:
                if attempt + 1 < attempts:
                    time.sleep(0.5)
                    continue
                raise UserError(f"{method} {url}: the annotation app dropped the connection ({e}); try again") from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    raise self._timeout(method, url) from None
                raise UserError(
                    f"the annotation app at {self.url} is not reachable ({e.reason}) ({method} {url}); start it "
                    f"('rlhfkit annotate --db ...') or check the url"
                ) from None
            except TimeoutError:
                raise self._timeout(method, url) from None
        raise AssertionError("unreachable")

    def _timeout(self, method: str, url: str) -> UserError:
        return UserError(
            f"{method} {url}: the annotation app did not answer within {self.timeout} s; check that it is "
            f"running, or give AppClient a longer timeout"
        )


def _server_error(error: urllib.error.HTTPError) -> tuple[str | None, str]:
    """(the app's error code, ``code: message``) from its JSON error body, else (None, the body's text)."""
    text = error.read().decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and "message" in body:
        code = body.get("error")
        return code, f"{code}: {body['message']}"
    return None, text.strip()[:500] or str(error.reason)
