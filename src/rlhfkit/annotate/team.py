"""A simulated team of annotators that ranks in the annotation app over HTTP, as people would.

Each :class:`SimulatedAnnotator` scores a set's responses with a rule (the same signature as
``rlhfkit.pipeline.simulated.lexicon_reward``: ``rule(prompts, responses) -> scores``), adds
their own bias and noise, and ranks best first:

    score_i = rule(prompt, response_i) + length_bias * words(response_i) / 100 + noise_i
    noise_i ~ Normal(0, noise^2), drawn from a generator seeded by (seed, name, set id)

so an annotator ranks a set the same way whichever thread gets there first, and two
annotators with different noise or bias disagree the way people do (measurable with
``GET /api/stats``). :class:`SimulatedTeam` runs one thread per annotator, each looping
``GET /api/next`` -> score -> ``POST /api/rankings`` through :class:`AppClient` only: the app
cannot tell the team from people, and people may rank beside it.

``SimulatedTeam.rank(quota)`` submits exactly ``quota`` rankings: an annotator takes a ticket
under a lock before each POST and gives it back if the POST fails, so the count never
overshoots, and a pipeline killed mid-round continues with ``rank(quota - already_ranked)``.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from rlhfkit.annotate.client import AppClient

Rule = Callable[[list[str], list[str]], Sequence[float]]
"""``rule(prompts, responses) -> scores``: one score per (prompt, response) pair, higher is better."""


@dataclass(frozen=True)
class SimulatedAnnotator:
    """One simulated person: their user in the app (``name``, ``token``) and how they judge."""

    name: str
    token: str
    noise: float = 0.0
    """std of the Gaussian noise added to each response's score (0: the rule's order exactly)"""
    length_bias: float = 0.0
    """points added to a response's score per 100 words (> 0: prefers long answers)"""
    seconds_per_ranking: float = 0.0
    """time spent on each set before submitting, to emulate a person"""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name or not self.token:
            raise ValueError(f"a simulated annotator needs a user name and token, got name={self.name!r}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"annotator {self.name!r}: noise={self.noise} must be a finite number >= 0")
        if not math.isfinite(self.length_bias):
            raise ValueError(f"annotator {self.name!r}: length_bias={self.length_bias} must be finite")
        if not (math.isfinite(self.seconds_per_ranking) and self.seconds_per_ranking >= 0):
            raise ValueError(f"annotator {self.name!r}: seconds_per_ranking={self.seconds_per_ranking} must be >= 0")
        if self.seed < 0:
            raise ValueError(f"annotator {self.name!r}: seed={self.seed} must be >= 0")

    def scores(self, rule: Rule, set_id: int, prompt: str, responses: Sequence[str]) -> list[float]:
        """This annotator's score of each response of set ``set_id`` (see the module docstring)."""
        base = [float(x) for x in rule([prompt] * len(responses), list(responses))]
        if len(base) != len(responses):
            raise ValueError(f"the rule gave {len(base)} scores for {len(responses)} responses")
        # crc32, not hash(): the same name gives the same stream in every process.
        rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode("utf-8")), set_id])
        noise = rng.normal(0.0, self.noise, size=len(responses)) if self.noise > 0 else np.zeros(len(responses))
        return [
            b + self.length_bias * len(text.split()) / 100.0 + float(n)
            for b, text, n in zip(base, responses, noise, strict=True)
        ]

    def ranking(self, rule: Rule, task: dict, allow_ties: bool) -> list[list[int]]:
        """Tie groups of response indices, best first, for a ``/api/next`` task."""
        return groups_from_scores(self.scores(rule, task["set_id"], task["prompt"], task["responses"]), allow_ties)


def groups_from_scores(scores: Sequence[float], allow_ties: bool) -> list[list[int]]:
    """Best first: ``[3.0, 1.0, 3.0]`` -> ``[[0, 2], [1]]`` with ties, ``[[0], [2], [1]]`` without
    (equal scores in index order). A list of all-equal scores states no preference, which the
    app refuses, so it is ordered by index even when ties are allowed."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if not allow_ties or len(set(scores)) == 1:
        return [[i] for i in order]
    groups: list[list[int]] = []
    for i in order:
        if groups and scores[groups[-1][0]] == scores[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _Tickets:
    """Exactly ``quota`` submissions: a ticket is taken before a POST and kept only if it succeeds."""

    def __init__(self, quota: int):
        self.quota = quota
        self.submitted = 0
        self.in_flight = 0
        self.halted = False  # a worker failed: every worker stops
        self._cond = threading.Condition()

    def done(self) -> bool:
        with self._cond:
            return self.halted or self.submitted >= self.quota

    def claim(self, stop: threading.Event) -> bool:
        """Take a ticket; wait while the POSTs in flight could still fill the quota. False: stop."""
        with self._cond:
            while self.submitted + self.in_flight >= self.quota and self.submitted < self.quota:
                if stop.is_set() or self.halted:
                    return False
                self._cond.wait(0.1)
            if self.submitted >= self.quota or stop.is_set() or self.halted:
                return False
            self.in_flight += 1
            return True

    def settle(self, ok: bool) -> None:
        with self._cond:
            self.in_flight -= 1
            self.submitted += ok
            self._cond.notify_all()

    def halt(self) -> None:
        with self._cond:
            self.halted = True
            self._cond.notify_all()


class SimulatedTeam:
    """Simulated ``annotators`` ranking in the app at ``url`` by ``rule``, over HTTP only.

    ``poll_s``: how long an annotator waits before asking again when no set waits for them.
    ``patience_s``: give up after this long with no set for an annotator (None: wait until the
    quota is reached or ``stop_event`` is set). Whether ties are allowed is the app's setting
    (``GET /api/me``).
    """

    def __init__(
        self,
        url: str,
        annotators: Sequence[SimulatedAnnotator],
        rule: Rule,
        *,
        poll_s: float = 0.2,
        patience_s: float | None = None,
        timeout: float = 30.0,
    ):
        names = [a.name for a in annotators]
        if not annotators or len(set(names)) != len(names):
            raise ValueError(f"a simulated team needs one or more annotators with distinct names, got {names}")
        self.url = url
        self.annotators = list(annotators)
        self.rule = rule
        self.poll_s = poll_s
        self.patience_s = patience_s
        self.clients = {a.name: AppClient(url, a.token, timeout=timeout) for a in annotators}

    def rank(self, quota: int, stop_event: threading.Event | None = None, round: int | None = None) -> int:
        """Submit exactly ``quota`` rankings (fewer only if ``stop_event`` is set or, with
        ``patience_s``, every annotator ran out of sets); returns how many were submitted.

        ``round``: rank only that round's sets (a set of another round counts as none waiting).
        An HTTP error of any annotator stops the team and is raised here
        (:class:`~rlhfkit.errors.UserError`).
        """
        if quota < 0:
            raise ValueError(f"quota={quota} must be >= 0")
        if quota == 0:
            return 0
        stop = stop_event if stop_event is not None else threading.Event()
        allow_ties = {a.name: bool(self.clients[a.name].me()["allow_ties"]) for a in self.annotators}
        tickets = _Tickets(quota)
        errors: list[BaseException] = []

        def work(annotator: SimulatedAnnotator) -> None:
            try:
                self._work(annotator, allow_ties[annotator.name], tickets, stop, round)
            except BaseException as e:  # raised in the caller's thread below
                errors.append(e)
                tickets.halt()

        threads = [
            threading.Thread(target=work, args=(a,), name=f"simulated-annotator-{a.name}", daemon=True)
            for a in self.annotators
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C while waiting: no annotator may POST after rank() is gone
            tickets.halt()
            raise
        if errors:
            raise errors[0]
        return tickets.submitted

    def _work(
        self,
        annotator: SimulatedAnnotator,
        allow_ties: bool,
        tickets: _Tickets,
        stop: threading.Event,
        round: int | None,
    ) -> None:
        client = self.clients[annotator.name]
        idle_since: float | None = None
        while not (stop.is_set() or tickets.done()):
            task = client.next_set()
            if task.get("status") != "ready" or (round is not None and task.get("round") != round):
                idle_since = time.monotonic() if idle_since is None else idle_since
                if self.patience_s is not None and time.monotonic() - idle_since > self.patience_s:
                    return
                stop.wait(self.poll_s)
                continue
            idle_since = None
            groups = annotator.ranking(self.rule, task, allow_ties)
            if annotator.seconds_per_ranking > 0 and stop.wait(annotator.seconds_per_ranking):
                return
            if not tickets.claim(stop):
                return
            ok = False
            try:
                client.submit(task["set_id"], groups)
                ok = True
            finally:
                tickets.settle(ok)
