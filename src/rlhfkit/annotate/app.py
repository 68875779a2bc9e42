"""The annotation web app: a JSON API under ``/api`` and two static pages.

Every ``/api`` route except ``/api/health`` needs ``Authorization: Bearer <token>``
(tokens come from ``rlhfkit annotate add-user``). Errors are JSON
``{"error": code, "message": what went wrong and what to do}`` with a 4xx status, and a
request that fails changes nothing. Every integer a route takes is range-checked first
(ids 1 .. 2**63 - 1, what SQLite holds), so none can overflow the database driver. Annotators see and change only their own rankings;
an admin sees and may delete or restore every ranking. Names with counts and per-pair agreement
are for admins; an annotator's ``/api/stats`` holds their own counts, the totals and the overall
agreement.

Endpoints:

- ``GET /api/me``: who am I, and the task settings (K, ties allowed, model).
- ``GET /api/next?mode=next|random&prompt_id=&wait=``: the next generation set to rank
  (200 ``status: ready``), ``202 status: generating`` while its responses are being
  generated (poll again), or ``status: empty`` when the pool is done.
- ``POST /api/prompts {"text"}``: add a typed prompt; then ``/api/next?prompt_id=``.
- ``POST /api/rankings {"set_id", "ranking": [[best], [next, tied], ...], "comment"}``.
- ``POST /api/skips {"set_id"}``.
- ``GET /api/rankings?page=&per_page=&annotator=&prompt=&prompt_id=&deleted=&round=``.
- ``GET|PATCH|DELETE /api/rankings/{id}``, ``POST /api/rankings/{id}/restore``.
- ``GET /api/stats``: counts, inter-annotator agreement and agreement with the consensus
  (per annotator and pair: admins only).
- ``GET /api/export?format=tsv|jsonl`` (same filters as the list).
- ``POST /api/sets {"prompt", "responses", "round", "key", "priority", "model"}`` (admins): push
  a generation set to rank (``rlhfkit pipeline`` with ``rounds:``); the same ``key`` again is a
  no-op (200, ``created: false``). Pushed sets are served newest round first.
- ``GET /api/rounds/{round}`` (admins): how many of the round's sets are ranked, by whom.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.annotate.agreement import agreement_report
from rlhfkit.annotate.generator import Generator, Pregenerator, Selector
from rlhfkit.annotate.store import (
    AnnotationStore,
    Conflict,
    GenerationSet,
    NotFound,
    Ranking,
    User,
    export_rankings,
)

MAX_COMMENT_CHARS = 5000
MAX_PROMPT_CHARS = 4000
MAX_RESPONSE_CHARS = 16000
MAX_PUSHED_K = 16  # responses in a pushed set at most
MAX_KEY_CHARS = 200
MAX_PER_PAGE = 100
SQLITE_INT_MAX = 2**63 - 1  # SQLite integers are signed 64-bit; a larger Python int overflows in the driver
STATIC_DIR = Path(str(resources.files("rlhfkit.annotate") / "static"))

# Pages run only our own scripts and styles; generated text is inserted with textContent,
# and this policy would still block an inline script or handler that slipped through.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, and JSON bodies that are not valid
    UTF-8 with a 400 that says so, before the app reads them.

    Checks ``Content-Length`` up front and counts chunked bodies as they arrive (the body
    is buffered, which is fine at this size), so an oversized request never reaches a route.
    The body's bytes are decoded as the JSON parser will (UTF-8; UTF-16 or -32 only when
    the bytes say so, as ``json.loads`` detects): FastAPI would answer a decoding error
    with a bare "There was an error parsing the body".
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = _error(
            413,
            "body_too_large",
            f"the request body is larger than the {self.max_bytes} bytes this server accepts; send less text",
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await too_big(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await too_big(scope, receive, send)
                return
        content_type = dict(scope["headers"]).get(b"content-type", b"application/json").decode("latin-1").lower()
        if body and "json" in content_type:
            encoding = json.detect_encoding(body)
            try:
                body.decode(encoding)
            except UnicodeDecodeError as e:
                await _error(
                    400,
                    "invalid_json",
                    f"request body is not valid UTF-8 JSON: byte 0x{body[e.start]:02x} at offset {e.start} is not "
                    f"{encoding.upper()} ({e.reason}); send the JSON text encoded as UTF-8",
                )(scope, receive, send)
                return
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptIn(_Body):
    text: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


# Every integer the API takes is range-checked before a route runs, so none reaches SQLite out
# of range (the driver would raise OverflowError: a 500). Ids are RowId; ``page`` is bounded so
# that its row offset fits as well.
RowId = Annotated[int, Field(ge=1, le=SQLITE_INT_MAX)]
StrictRowId = Annotated[RowId, Strict()]  # in JSON bodies, where "1" (a string) is refused
# Response indices are checked against 0..K-1 by ranks_from_groups, whose message names the range.
Groups = Annotated[list[list[StrictInt]], Field(min_length=1, description="tie groups, best first")]


class RankingIn(_Body):
    set_id: StrictRowId
    ranking: Groups
    comment: Annotated[str, Field(max_length=MAX_COMMENT_CHARS)] = ""


class RankingPatch(_Body):
    ranking: Groups | None = None
    comment: Annotated[str, Field(max_length=MAX_COMMENT_CHARS)] | None = None


class SkipIn(_Body):
    set_id: StrictRowId


class SetIn(_Body):
    """A generation set pushed by ``POST /api/sets``; its K may differ from the server's."""

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    responses: Annotated[
        list[Annotated[str, Strict(), Field(min_length=1, max_length=MAX_RESPONSE_CHARS)]],
        Field(min_length=2, max_length=MAX_PUSHED_K),
    ]
    round: StrictRowId | None = None
    key: Annotated[str, Field(min_length=1, max_length=MAX_KEY_CHARS)] | None = None
    priority: Annotated[float, Strict(), Field(allow_inf_nan=False)] = 0.0
    model: Annotated[str, Field(min_length=1, max_length=200)] = "pipeline"


# ---------------------------------------------------------------- helpers


def ranks_from_groups(groups: list[list[int]], k: int, allow_ties: bool) -> list[int]:
    """``[[2], [0, 1], [3]]`` (tie groups, best first) -> ranks ``[1, 1, 0, 2]`` (0 = best).

    Raises ``ApiError`` 422 unless the groups hold each of the K shown responses exactly once.
    """
    flat = [i for group in groups for i in group]
    if any(not group for group in groups) or sorted(flat) != list(range(k)):
        raise ApiError(
            422,
            "invalid_ranking",
            f"'ranking' must list each of the {k} shown responses (indices 0..{k - 1}) exactly once, "
            f"as groups best first like {[[i] for i in range(k)]}; got {groups}",
        )
    if len(groups) != k and not allow_ties:
        raise ApiError(
            422,
            "ties_not_allowed",
            f"this task does not allow ties, but 'ranking' {groups} puts several responses in one group; "
            f"give every response its own group (restart the server with --allow-ties to allow ties)",
        )
    if len(groups) == 1:
        raise ApiError(422, "invalid_ranking", "'ranking' ties every response, which states no preference; order them")
    ranks = [0] * k
    for rank, group in enumerate(groups):
        for i in group:
            ranks[i] = rank
    return ranks


def groups_from_ranks(ranks: tuple[int, ...]) -> list[list[int]]:
    return [[i for i, r in enumerate(ranks) if r == rank] for rank in sorted(set(ranks))]


def _task(s: GenerationSet, allow_ties: bool) -> dict:
    return {
        "status": "ready",
        "set_id": s.id,
        "prompt_id": s.prompt_id,
        "prompt": s.prompt,
        "responses": list(s.responses),
        "k": s.k,
        "allow_ties": allow_ties,
        "model": s.model,
        "round": s.round,
    }


def _ranking_json(r: Ranking, user: User) -> dict:
    return {
        "id": r.id,
        "set_id": r.set_id,
        "prompt_id": r.prompt_id,
        "prompt": r.prompt,
        "responses": list(r.responses),
        "ranks": list(r.ranks),
        "ranking": groups_from_ranks(r.ranks),
        "comment": r.comment,
        "annotator": r.annotator,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "deleted": r.deleted_at is not None,
        "can_edit": user.is_admin or r.user_id == user.id,
        "round": r.round,
    }


def current_user(request: Request) -> User:
    """The user whose token is in ``Authorization: Bearer <token>``, else 401."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise ApiError(
            401,
            "missing_token",
            "this request needs 'Authorization: Bearer <token>'; get a token with "
            "'rlhfkit annotate add-user NAME --db ...'",
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "invalid_token", "the Authorization header must be 'Bearer <token>'")
    user = request.app.state.store.user_for_token(token.strip())
    if user is None:
        raise ApiError(401, "invalid_token", "this token is not known to this server; check it or ask for a new one")
    return user


# Module level, so FastAPI can resolve the (postponed) annotation ``user: Auth``.
Auth = Annotated[User, Depends(current_user)]


# ---------------------------------------------------------------- the app


def create_app(
    store: AnnotationStore,
    generator: Generator,
    k: int = 4,
    allow_ties: bool = False,
    *,
    overlap: int = 2,
    overlap_share: float = 1.0,
    prefetch: int = 4,
    selector: Selector | None = None,
    candidates: int | None = None,
    max_body_bytes: int = 64 * 1024,
    max_wait_s: float = 10.0,
    pushed_only: bool = False,
) -> FastAPI:
    """The annotation app over ``store``; generation runs on one background thread.

    ``overlap``: how many annotators the pool order gives a shared generation set to (2 or more
    makes agreement measurable); ``overlap_share``: the share of sets that are shared (the others
    go to one annotator). ``prefetch``: untouched pool sets kept ready ahead. ``selector``:
    sample ``candidates`` responses per prompt and keep the K it picks, the set's priority its
    uncertainty (``annotate --selection uncertainty``); None keeps the first K sampled.
    ``pushed_only``: serve only the sets pushed to ``POST /api/sets`` and generate nothing
    (``generator`` is never called, ``/api/next`` answers ``empty`` while no set waits, typed
    prompts are refused).
    """
    if k < 2:
        raise ValueError(f"k={k}: a rank list needs at least 2 responses")
    if overlap < 1 or prefetch < 0 or not 0.0 <= overlap_share <= 1.0:
        raise ValueError(
            f"overlap={overlap} must be >= 1, overlap_share={overlap_share} in [0, 1] and prefetch={prefetch} >= 0"
        )
    if pushed_only:
        prefetch = 0
    pregen = Pregenerator(store, generator, k, prefetch=prefetch, selector=selector, candidates=candidates)
    no_generator = (
        "this server generates no responses: it serves the generation sets the pipeline pushes; "
        "use Next to rank the next pushed set"
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        pregen.start()
        yield
        pregen.stop()

    app = FastAPI(title="rlhfkit annotate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.pregen = store, pregen
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = CSP
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" or tuple(e.get("loc", ())) == ("body",) for e in errors):
            return _error(
                400,
                "invalid_json",
                "the request body must be one JSON object, sent with Content-Type: application/json",
            )
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in errors]
        return _error(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {
            404: f"there is no page or endpoint at {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    def owned_ranking(ranking_id: int, user: User) -> Ranking:
        ranking = store.get_ranking(ranking_id)
        if ranking is None:
            raise ApiError(404, "unknown_ranking", f"ranking {ranking_id} does not exist")
        if not user.is_admin and ranking.user_id != user.id:
            raise ApiError(
                403, "forbidden", f"ranking {ranking_id} belongs to another annotator; you can only change your own"
            )
        return ranking

    def require_admin(user: User, what: str) -> None:
        if not user.is_admin:
            raise ApiError(403, "forbidden", f"only an admin can {what}; you are {user.name!r}, an annotator")

    def get_set(set_id: int) -> GenerationSet:
        s = store.get_set(set_id)
        if s is None:
            raise ApiError(404, "unknown_set", f"generation set {set_id} does not exist; fetch one from /api/next")
        return s

    # ------------------------------------------------------------ pages

    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse("/annotate")

    @app.get("/annotate", include_in_schema=False)
    def annotate_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "annotate.html")

    @app.get("/dataset", include_in_schema=False)
    def dataset_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "dataset.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # ------------------------------------------------------------ api

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/api/me")
    def me(user: Auth) -> dict:
        return {
            "name": user.name,
            "is_admin": user.is_admin,
            "k": k,
            "allow_ties": allow_ties,
            "model": generator.name,
            "prompts": store.count_prompts(),
        }

    @app.get("/api/next")
    def next_set(
        user: Auth,
        mode: Literal["next", "random"] = "next",
        prompt_id: RowId | None = None,
        wait: Annotated[float, Query(ge=0)] = 0.0,
    ) -> Response:
        if prompt_id is None and mode == "next":
            s = store.set_for_user(user.id, overlap=overlap, overlap_share=overlap_share)
            if s is not None:
                return JSONResponse(_task(s, allow_ties))
            if pushed_only:  # nothing to generate: wait for the next push
                return JSONResponse(
                    {"status": "empty", "message": "no generation set is waiting for you; ask again shortly"}
                )
            fresh = store.pool_prompts_without_sets(1)
            if not fresh:
                return JSONResponse(
                    {
                        "status": "empty",
                        "message": ("no pool prompt is waiting for you: rank a random prompt or type one"),
                    }
                )
            prompt = fresh[0]
        elif prompt_id is None:
            prompt = store.random_pool_prompt()
            if prompt is None:
                raise ApiError(
                    404, "no_prompts", "the prompt pool is empty; start the server with --prompts or type a prompt"
                )
        else:
            prompt = store.get_prompt(prompt_id)
            if prompt is None:
                raise ApiError(404, "unknown_prompt", f"prompt {prompt_id} does not exist")
        s = store.set_for_user(user.id, prompt_id=prompt.id)
        if s is None and pushed_only:
            raise ApiError(
                409, "no_generator", f"prompt {prompt.id} has no generation set waiting for you; {no_generator}"
            )
        if s is None:
            pregen.request(prompt.id)
            pregen.wait(prompt.id, min(wait, max_wait_s))
            s = store.set_for_user(user.id, prompt_id=prompt.id)
        if s is not None:
            return JSONResponse(_task(s, allow_ties))
        error = pregen.pop_error(prompt.id)
        if error is not None:
            raise ApiError(
                503,
                "generation_failed",
                f"generating responses for prompt {prompt.id} failed ({error}); ask again to retry",
            )
        return JSONResponse(
            {
                "status": "generating",
                "prompt_id": prompt.id,
                "prompt": prompt.text,
                "queue_position": pregen.position(prompt.id),
                "message": "generating responses; ask again shortly",
            },
            status_code=202,
        )

    @app.post("/api/prompts", status_code=201)
    def add_prompt(body: PromptIn, user: Auth) -> Response:
        if pushed_only:
            raise ApiError(409, "no_generator", f"typed prompts cannot be ranked here; {no_generator}")
        if not body.text.strip():
            raise ApiError(422, "invalid_prompt", "the prompt is empty; type some text")
        prompt, created = store.add_typed_prompt(body.text, user.id)
        return JSONResponse(
            {"prompt_id": prompt.id, "prompt": prompt.text, "source": prompt.source},
            status_code=201 if created else 200,
        )

    @app.post("/api/rankings", status_code=201)
    def submit(body: RankingIn, user: Auth) -> dict:
        s = get_set(body.set_id)
        ranks = ranks_from_groups(body.ranking, s.k, allow_ties)
        try:
            ranking_id = store.add_ranking(s.id, user.id, ranks, body.comment)
        except Conflict as e:
            raise ApiError(409, "already_ranked", str(e)) from None
        return {"id": ranking_id, "set_id": s.id, "ranks": ranks}

    @app.post("/api/skips", status_code=201)
    def skip(body: SkipIn, user: Auth) -> dict:
        s = get_set(body.set_id)
        store.skip(s.id, user.id)
        return {"set_id": s.id, "skipped": True}

    @app.post("/api/sets", status_code=201)
    def push_set(body: SetIn, user: Auth) -> Response:
        """Admins: add a generation set to the queue (``rlhfkit pipeline`` pushes each round's sets)."""
        require_admin(user, "push generation sets")
        if not body.prompt.strip():
            raise ApiError(422, "invalid_set", "'prompt' is blank; push the prompt the responses answer")
        blank = [i for i, text in enumerate(body.responses) if not text.strip()]
        if blank:
            raise ApiError(422, "invalid_set", f"'responses' {blank} are blank; a set holds K non-blank responses")
        if len(set(body.responses)) < len(body.responses):
            raise ApiError(
                422, "invalid_set", "'responses' holds the same text twice; a set holds K distinct responses"
            )
        try:
            set_id, created = store.put_round_set(
                body.prompt,
                body.responses,
                round=body.round,
                key=body.key,
                priority=body.priority,
                model=body.model,
            )
        except Conflict as e:
            raise ApiError(409, "key_conflict", str(e)) from None
        return JSONResponse(
            {"set_id": set_id, "created": created, "round": body.round, "key": body.key},
            status_code=201 if created else 200,
        )

    @app.get("/api/rounds/{round}")
    def round_progress(round: RowId, user: Auth) -> dict:
        """Admins: the round's sets, their live rankings, and each annotator's count."""
        require_admin(user, "see a round's progress")
        return store.round_progress(round)

    def _filters(user: User, annotator: str | None, prompt_id: int | None) -> dict:
        if prompt_id is not None and store.get_prompt(prompt_id) is None:
            raise ApiError(404, "unknown_prompt", f"prompt {prompt_id} does not exist")
        if annotator is None:
            return {"user_id": None if user.is_admin else user.id}
        if not user.is_admin and annotator != user.name:
            raise ApiError(403, "forbidden", f"annotators can only see their own rankings; you are {user.name!r}")
        target = store.user_by_name(annotator)
        if target is None:
            raise ApiError(404, "unknown_annotator", f"there is no annotator named {annotator!r}")
        return {"user_id": target.id}

    @app.get("/api/rankings")
    def list_rankings(
        user: Auth,
        page: Annotated[int, Query(ge=1, le=SQLITE_INT_MAX // MAX_PER_PAGE)] = 1,
        per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = 20,
        annotator: str | None = None,
        prompt: Annotated[str | None, Query(max_length=MAX_PROMPT_CHARS)] = None,
        prompt_id: RowId | None = None,
        deleted: bool = False,
        round: RowId | None = None,
    ) -> dict:
        filters = _filters(user, annotator, prompt_id)
        rows, total = store.list_rankings(
            **filters,
            prompt_id=prompt_id,
            prompt_contains=prompt,
            deleted=deleted,
            round=round,
            limit=per_page,
            offset=(page - 1) * per_page,
        )
        return {
            "items": [_ranking_json(r, user) for r in rows],
            "total": total,
            "page": page,
            "per_page": per_page,
            "pages": max(1, -(-total // per_page)),
        }

    @app.get("/api/rankings/{ranking_id}")
    def get_ranking(ranking_id: RowId, user: Auth) -> dict:
        return _ranking_json(owned_ranking(ranking_id, user), user)

    @app.patch("/api/rankings/{ranking_id}")
    def edit_ranking(ranking_id: RowId, body: RankingPatch, user: Auth) -> dict:
        ranking = owned_ranking(ranking_id, user)
        ranks = None if body.ranking is None else ranks_from_groups(body.ranking, len(ranking.responses), allow_ties)
        try:
            store.update_ranking(ranking_id, ranks=ranks, comment=body.comment)
        except Conflict as e:
            raise ApiError(409, "deleted", str(e)) from None
        return _ranking_json(owned_ranking(ranking_id, user), user)

    @app.delete("/api/rankings/{ranking_id}")
    def delete_ranking(ranking_id: RowId, user: Auth) -> dict:
        owned_ranking(ranking_id, user)
        try:
            store.delete_ranking(ranking_id, user.id)
        except Conflict as e:
            raise ApiError(409, "already_deleted", str(e)) from None
        return {"id": ranking_id, "deleted": True}

    @app.post("/api/rankings/{ranking_id}/restore")
    def restore_ranking(ranking_id: RowId, user: Auth) -> dict:
        owned_ranking(ranking_id, user)
        try:
            store.restore_ranking(ranking_id)
        except Conflict as e:
            raise ApiError(409, "cannot_restore", str(e)) from None
        return {"id": ranking_id, "deleted": False}

    @app.get("/api/stats")
    def stats(user: Auth) -> dict:
        """Admins: every annotator's counts, every pair's agreement and every annotator's
        agreement with the consensus of the others (``consensus_tau``, ``consensus_sets``).
        Annotators: their own counts, the totals and the overall agreement (``consensus_tau``
        included), without names: who else annotates here, and how much, is the organiser's
        to know."""
        counts = store.counts_by_user()
        agreement = agreement_report(store.shared_rankings())
        totals = {
            "annotators": len(counts),
            "rankings": sum(c["rankings"] for c in counts),
            "skips": sum(c["skips"] for c in counts),
        }
        if user.is_admin:
            return {"annotators": counts, "totals": totals, "agreement": agreement}
        own = [c for c in counts if c["annotator"] == user.name]
        return {
            "annotators": own,
            "totals": totals,
            "agreement": {"pairs": [], "consensus": [], "overall": agreement["overall"]},
        }

    @app.get("/api/export")
    def export(
        user: Auth,
        format: Literal["tsv", "jsonl"] = "jsonl",
        annotator: str | None = None,
        prompt: Annotated[str | None, Query(max_length=MAX_PROMPT_CHARS)] = None,
        prompt_id: RowId | None = None,
        round: RowId | None = None,
    ) -> Response:
        filters = _filters(user, annotator, prompt_id)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"annotations.{format}"
            try:
                export_rankings(
                    store, path, format, **filters, prompt_id=prompt_id, prompt_contains=prompt, round=round
                )
            except NotFound as e:
                raise ApiError(404, "nothing_to_export", str(e)) from None
            except ValueError as e:  # the writer refuses what the format cannot hold
                raise ApiError(422, "cannot_export", str(e)) from None
            content = path.read_bytes()
        media = "text/tab-separated-values" if format == "tsv" else "application/x-ndjson"
        return Response(
            content,
            media_type=f"{media}; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="annotations.{format}"'},
        )

    return app
