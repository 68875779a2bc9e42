"""InstructGPT's loop in the pipeline (``rounds: N``): people rank the policy's own samples,
round after round (Ouyang et al. 2022, arXiv 2203.02155, sec. 3.5: "steps 2 and 3 can be
iterated continuously").

Each round ``r`` is four stages under ``OUTPUT/round-r/``:

1. ``preferences``: sample ``candidates`` responses per prompt of the round from the current
   policy, keep ``samples_per_prompt`` of them (``selection: uncertainty``: the ones the last
   round's reward-model ensemble disputes most, served first), push the sets into the
   annotation app's queue (each with a key, so a resumed round never pushes a set twice), and
   wait until the round's ``quota`` of rankings is in (a progress bar whose ETA is the observed
   annotation rate). People rank in the app; ``source: simulated`` runs a simulated team of
   annotators against the same HTTP API. Then every ranking so far is written as the training
   lists (``aggregate``: every ranking, the consensus per set, or weighted by agreement).
2. ``reward_model``: trained on every list ranked so far, from the starting policy (default) or
   from the last round's reward model (``reward_model: {warm_start: true}``).
3. the online-RL stage (``algorithm: [ppo]`` or any other one): continues from the last round's
   policy against the new reward model; the KL stays anchored to the starting (SFT) policy.
4. ``evaluation``: the round's policy against the starting policy on held-out prompts.

The app's database is the truth about rankings: a pipeline killed while waiting, or in a
later stage, and started again loses none (they are in the database), counts none twice (a
round's quota is met from the database's count) and serves no set twice to one annotator
(the app never does).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rlhfkit.annotate.agreement import agreement_report, annotator_weights
from rlhfkit.annotate.client import AppClient
from rlhfkit.annotate.store import AnnotationStore, Ranking, exported_lists
from rlhfkit.data.prompts import Prompt, read_prompts
from rlhfkit.data.types import PreferenceExample
from rlhfkit.data.writers import write_preferences
from rlhfkit.errors import UserError
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.policy import inference_dtype, load_policy
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.sampling import SamplingSettings, sample_texts

logger = logging.getLogger(__name__)

TOKEN_ENV = "RLHFKIT_ANNOTATE_TOKEN"  # the admin token of an app given by url, when the YAML has none
ADMIN = "pipeline"  # the admin user the pipeline pushes sets as, in an app it starts


def round_prompts(prompts: list[Prompt], n: int, round_: int) -> list[Prompt]:
    """The ``n`` prompts of round ``round_`` (1-based): the next ``n`` of the file, wrapping
    around at its end, so consecutive rounds ask about different prompts while the file lasts."""
    start = (round_ - 1) * n
    return [prompts[(start + i) % len(prompts)] for i in range(n)]


def ranking_from_json(row: dict) -> Ranking:
    """A ranking as ``GET /api/rankings`` returns it, as the store's :class:`Ranking`."""
    return Ranking(
        id=row["id"],
        set_id=row["set_id"],
        prompt_id=row.get("prompt_id", 0),
        prompt=row["prompt"],
        responses=tuple(row["responses"]),
        ranks=tuple(row["ranks"]),
        comment=row.get("comment", ""),
        user_id=row.get("user_id", 0),
        annotator=row["annotator"],
        created_at=row.get("created_at", ""),
        updated_at=row.get("updated_at"),
        deleted_at=row.get("deleted_at"),
        round=row.get("round"),
    )


def training_lists(rankings: list[Ranking], aggregate: str) -> list[PreferenceExample]:
    """The lists the reward model trains on: every live ranking so far, aggregated
    (:func:`rlhfkit.annotate.store.exported_lists`), oldest first."""
    return [x.example for x in exported_lists(sorted(rankings, key=lambda r: r.id), aggregate)]


@dataclass
class App:
    """The annotation app of a run: one the pipeline started (``server`` set) or one given by url."""

    client: AppClient
    url: str
    run_key: str  # tells this run's pushed sets from another run's in a shared app
    server: Any = None
    store: AnnotationStore | None = None
    tokens: dict[str, str] | None = None  # name -> token of the users the pipeline made (its own app)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.store is not None:
            self.store.close()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_private(path: Path, data: dict) -> None:
    """Write ``data`` as JSON readable by the owner only, atomically (tokens are secrets)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def open_app(prefs: Any, out: Path, users: list[str]) -> App:
    """Start the app on ``OUTPUT/annotate/annotations.db`` (or connect to ``prefs.url``).

    In an app it starts, the pipeline makes an admin user (``pipeline``) and one user per name
    in ``users`` (the simulated team), keeping their tokens in ``OUTPUT/annotate/tokens.json``
    (owner-only) so a resumed pipeline acts as the same people. People add themselves with
    ``rlhfkit annotate add-user --db OUTPUT/annotate/annotations.db NAME``.
    """
    folder = out / "annotate"
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "run.json"
    meta = _read_json(meta_path)
    if "run_key" not in meta:
        meta["run_key"] = uuid.uuid4().hex[:12]
        meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if prefs.url:
        token = prefs.token or os.environ.get(TOKEN_ENV)
        if not token:
            raise UserError(
                f"pipeline preferences: url {prefs.url} needs an admin token: set preferences.token or the "
                f"environment variable {TOKEN_ENV} (make one with 'rlhfkit annotate add-user --admin')"
            )
        client = AppClient(prefs.url, token)
        me = client.me()
        if not me.get("is_admin", me.get("admin", False)):
            raise UserError(
                f"pipeline preferences: the token for {prefs.url} belongs to {me.get('name')!r}, who is not an "
                "admin; pushing sets needs an admin token (rlhfkit annotate add-user --admin)"
            )
        return App(client, prefs.url.rstrip("/"), meta["run_key"])

    from rlhfkit.annotate.server import AppServer

    store = AnnotationStore(folder / "annotations.db")
    tokens_path = folder / "tokens.json"
    tokens = _read_json(tokens_path)
    for name, admin in [(ADMIN, True), *((u, False) for u in users)]:
        if name in tokens:
            continue
        if store.user_by_name(name) is not None:
            raise UserError(
                f"pipeline: {tokens_path} has no token for {name!r}, who exists in {folder / 'annotations.db'}; "
                "restore the file, or start a new output folder"
            )
        tokens[name] = store.add_user(name, admin=admin)
        _write_private(tokens_path, tokens)
    server = AppServer(
        store,
        k=prefs.samples_per_prompt,
        allow_ties=prefs.allow_ties,
        overlap=prefs.annotators_per_set,
        overlap_share=prefs.overlap_share,
        port=prefs.port,
    )
    print(
        f"annotation app: {server.url}/annotate (database {folder / 'annotations.db'}; add people with "
        f"'rlhfkit annotate add-user --db {folder / 'annotations.db'} NAME')",
        flush=True,
    )
    return App(AppClient(server.url, tokens[ADMIN]), server.url, meta["run_key"], server, store, tokens)


def sample_round(policy: str, prompts: list[Prompt], prefs: Any, round_: int) -> list[list[str]]:
    """``candidates`` responses to each prompt from ``policy`` (seeded by the round)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_policy(policy, device=device, dtype=inference_dtype(None, device))
    apply_cpu_matmul("auto", device, model)
    settings = SamplingSettings(max_new_tokens=prefs.max_new_tokens, temperature=prefs.temperature, top_p=prefs.top_p)
    chat = use_chat_template(tokenizer, prefs.chat_template, policy)
    m = prefs.candidates or prefs.samples_per_prompt
    return sample_texts(
        model, tokenizer, prompts, m, settings, chat=chat, batch_size=prefs.batch_size, seed=prefs.seed + round_ - 1
    )


def choose(prompts: list[Prompt], candidates: list[list[str]], k: int, selector: Any) -> list[tuple[list[str], float]]:
    """Per prompt, the ``k`` responses to show and the set's priority: the selector's pick
    (uncertainty) or the first ``k`` distinct ones at priority 0 (random: samples are i.i.d.)."""
    sets = []
    for p, cands in zip(prompts, candidates):
        distinct = list(dict.fromkeys(c for c in cands if c.strip()))
        if len(distinct) < 2:
            continue  # nothing to rank: every sample the same (or empty); counted in the summary
        if selector is not None and len(distinct) > k:
            idx, priority = selector.select(p.text, distinct, k)
            sets.append(([distinct[i] for i in idx], float(priority)))
        else:
            sets.append((distinct[:k], 0.0))
    return sets


def load_selector(reward_model: str, lists: list[PreferenceExample], seed: int) -> Any:
    """The last round's reward model with a bootstrap ensemble of heads fit on every list so far."""
    from rlhfkit.annotate.selection import UncertaintySelector
    from rlhfkit.models.reward import RewardModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rm = RewardModel.from_pretrained(reward_model, device=device, option="reward_model")
    selector = UncertaintySelector(rm, extra=lists, seed=seed)
    pairs = selector.fit()
    logger.warning("uncertainty selection: the ensemble is fit on %d ranked pairs of %d lists", pairs, len(lists))
    return selector


def push_round(app: App, sets: list[tuple[str, list[str], float]], round_: int, model: str) -> int:
    """Push the round's sets (prompt, responses, priority); a set pushed before (same key) is kept. Returns new ones."""
    created = 0
    for i, (prompt, responses, priority) in enumerate(sets):
        key = f"{app.run_key}/round-{round_}/{i}"
        res = app.client.push_set(prompt, responses, round=round_, key=key, priority=priority, model=model)
        created += bool(res.get("created"))
    return created


def wait_for_quota(app: App, round_: int, quota: int, team: Any = None, poll_s: float = 0.25) -> dict:
    """Block until round ``round_`` has ``quota`` live rankings in the app, showing a progress bar
    with the ETA of the observed rate. With a simulated ``team``, it ranks exactly the missing
    ones (a resumed round continues from the database's count). Returns the round's progress."""
    progress = app.client.round_progress(round_)
    have = int(progress["rankings"])
    t0 = time.time()
    bar = tqdm(
        total=quota,
        initial=min(have, quota),
        desc=f"round {round_}: rankings",
        unit="ranking",
        dynamic_ncols=True,
        mininterval=0.5,
    )
    if have < quota and team is None:
        print(
            f"round {round_}: waiting for {quota - have} more ranking(s) in the app at {app.url}/annotate "
            "(Ctrl-C stops; running the pipeline again continues)",
            flush=True,
        )
    stop = threading.Event()
    failure: list[BaseException] = []
    worker = None
    if team is not None and have < quota:

        def rank() -> None:
            try:
                team.rank(quota - have, stop_event=stop, round=round_)
            except BaseException as e:  # surfaced in the main thread
                failure.append(e)

        worker = threading.Thread(target=rank, name=f"simulated-team-round-{round_}", daemon=True)
        worker.start()
    try:
        while have < quota:
            if failure:
                raise failure[0]
            time.sleep(poll_s)
            progress = app.client.round_progress(round_)
            now = int(progress["rankings"])
            if now > have:
                bar.update(min(now, quota) - min(have, quota))
            have = now
            if worker is not None and not worker.is_alive() and have < quota and not failure:
                raise UserError(
                    f"round {round_}: the simulated team stopped at {have} of {quota} rankings: the app has no set "
                    "left for them (lower preferences.quota or raise preferences.n_prompts)"
                )
    finally:
        stop.set()
        if worker is not None:
            worker.join(timeout=60)
        bar.close()
    if failure:
        raise failure[0]
    progress["waited_s"] = time.time() - t0
    return progress


def collect_round(
    app: App,
    policy: str,
    prefs: Any,
    prompts: list[Prompt],
    round_: int,
    folder: Path,
    *,
    selector_model: str | None,
    team: Any = None,
) -> dict:
    """The ``round-r/preferences`` stage: sample, select, push, wait, write the training lists."""
    n = len(prompts)
    progress = app.client.round_progress(round_)
    k = prefs.samples_per_prompt
    lists_before = [ranking_from_json(r) for r in app.client.rankings()]
    if int(progress["sets"]) < n:  # not every set pushed yet (a resumed round may have pushed some)
        t0 = time.time()
        candidates = sample_round(policy, prompts, prefs, round_)
        selector = None
        if prefs.selection == "uncertainty" and selector_model is not None:
            selector = load_selector(selector_model, training_lists(lists_before, prefs.aggregate), prefs.seed + round_)
        chosen = choose(prompts, candidates, k, selector)
        texts = [p.text for p, cands in zip(prompts, candidates) if len(set(c for c in cands if c.strip())) >= 2]
        pushed = push_round(app, [(t, r, pr) for t, (r, pr) in zip(texts, chosen)], round_, model=policy)
        logger.warning("round %d: %d sets pushed (%d new) in %.0f s", round_, len(chosen), pushed, time.time() - t0)
        progress = app.client.round_progress(round_)
    sets = int(progress["sets"])
    quota = min(prefs.quota or n, sets)
    if quota < (prefs.quota or n):
        logger.warning("round %d: only %d sets to rank (samples all alike elsewhere): quota %d", round_, sets, quota)
    progress = wait_for_quota(app, round_, quota, team)
    rankings = [ranking_from_json(r) for r in app.client.rankings()]
    examples = training_lists(rankings, prefs.aggregate)
    write_preferences(folder / "preferences.jsonl", examples, "ranked")
    this_round = [r for r in rankings if r.round == round_]
    per_set = Counter(r.set_id for r in rankings)
    shared = [(r.set_id, r.annotator, r.ranks) for r in rankings if per_set[r.set_id] > 1]
    agreement = agreement_report(shared) if shared else None
    summary = {
        "source": "simulated team of annotators (app over HTTP)" if team is not None else f"annotation app {app.url}",
        "round": round_,
        "selection": prefs.selection if selector_model is not None else "random",
        "aggregate": prefs.aggregate,
        "n_prompts": n,
        "sets_pushed": sets,
        "quota": quota,
        "rankings_this_round": len(this_round),
        "rankings_total": len(rankings),
        "ranking_ids": sorted(r.id for r in this_round),
        "n_lists": len(examples),
        "annotators": sorted({r.annotator for r in this_round}),
        "waited_s": round(progress.get("waited_s", 0.0), 2),
        "agreement": agreement["overall"] if agreement else None,
        "agreement_by_annotator": agreement["consensus"] if agreement else [],
        "annotator_weights": annotator_weights(shared) if prefs.aggregate == "weighted" else None,
    }
    (folder / "round.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def read_round_prompts(path: str, n: int | None, rounds: int) -> tuple[list[Prompt], int]:
    """Every prompt of the file and the number per round (``n``, or the file split evenly)."""
    prompts = read_prompts(path, option="preferences.prompts")
    per_round = n or max(1, len(prompts) // rounds)
    return prompts, per_round


TEAM_KEYS = ("name", "noise", "length_bias", "seconds_per_ranking")


def make_team(app: App, specs: list[dict], rule: Any, seed: int) -> Any:
    """The simulated team (:mod:`rlhfkit.annotate.team`) of ``preferences.team``, as the users the pipeline made."""
    from rlhfkit.annotate.team import SimulatedAnnotator, SimulatedTeam

    members = []
    for spec in specs:
        unknown = sorted(set(spec) - set(TEAM_KEYS))
        if unknown:
            raise UserError(
                f"pipeline preferences.team: unknown key(s) {unknown} for {spec['name']!r}; keys: {TEAM_KEYS}"
            )
        members.append(
            SimulatedAnnotator(
                name=spec["name"],
                token=app.tokens[spec["name"]],
                noise=float(spec.get("noise", 0.0)),
                length_bias=float(spec.get("length_bias", 0.0)),
                seconds_per_ranking=float(spec.get("seconds_per_ranking", 0.0)),
                seed=seed,
            )
        )
    return SimulatedTeam(app.url, members, rule)
