"""The reward model's uncertainty (evaluation/uncertainty.py, models/probe_fit.bootstrap_probes) and
``rlhfkit annotate --selection uncertainty`` end to end on the tiny model: math against plain loops,
a constructed case whose disputed candidates are known, reproducible heads, the app's order."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.evaluation.uncertainty import (
    ensemble_scores,
    pair_disagreement,
    select_candidates,
    set_uncertainty,
    text_distance,
)
from rlhfkit.models.probe_fit import bootstrap_probes, fit_pairwise_probe


def H(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_pair_disagreement_equals_the_plain_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 7, generator=g, dtype=torch.float64) * 3  # (E, M)
    fast = pair_disagreement(scores)
    e, m = scores.shape
    for i in range(m):
        for j in range(m):
            p = [1 / (1 + math.exp(-(scores[h, i] - scores[h, j]).item())) for h in range(e)]
            expected = 0.0 if i == j else H(sum(p) / e) - sum(H(x) for x in p) / e
            assert fast[i, j].item() == pytest.approx(max(expected, 0.0), abs=1e-9)
    assert torch.equal(fast, fast.T) and (fast >= 0).all() and (fast <= math.log(2) + 1e-12).all()


def test_ensemble_scores_is_every_head_on_every_text():
    g = torch.Generator().manual_seed(1)
    feats, heads = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    scores = ensemble_scores(feats, heads)
    assert scores.shape == (3, 6)
    for e in range(3):
        for n in range(6):
            assert scores[e, n].item() == pytest.approx(float(heads[e] @ feats[n]), abs=1e-6)


def test_heads_that_agree_give_no_disagreement_even_when_unsure():
    same = torch.tensor([[0.0, 0.01, 5.0]] * 4)  # every head: 0 and 1 a coin flip, 2 far above
    info = pair_disagreement(same)
    assert info.abs().max() < 1e-9  # BALD: shared (aleatoric) doubt is not disagreement


def constructed_case() -> tuple[torch.Tensor, list[str]]:
    """Six candidates, four heads: 0-3 agreed by every head, 4 and 5 disputed (half the heads
    put 4 far above, half far below the rest), and 5 a near-copy of 4."""
    scores = torch.tensor(
        [
            [1.0, 2.0, 3.0, 4.0, 20.0, 19.0],
            [1.0, 2.0, 3.0, 4.0, 20.0, 19.0],
            [1.0, 2.0, 3.0, 4.0, -20.0, -19.0],
            [1.0, 2.0, 3.0, 4.0, -20.0, -19.0],
        ]
    )  # (E=4, M=6)
    texts = [
        "a short plain answer",
        "a longer and more careful answer with details",
        "something else entirely",
        "yet another reply here",
        "the disputed answer says the sky is blue because air scatters short waves more",
        "the disputed answer says the sky is blue because air scatters short waves most",  # one word differs
    ]
    return scores, texts


def test_the_chosen_are_the_disputed_ones_and_near_duplicates_are_skipped():
    scores, texts = constructed_case()
    info = pair_disagreement(scores)
    assert info[4, 0] > 0.5 and info[0, 1] < 1e-3  # disputed vs agreed
    chosen = select_candidates(scores, 3, texts, min_distance=0.2)
    assert 4 in chosen and 5 not in chosen  # the disputed one, not its near-copy
    # Every other chosen candidate is one the heads dispute against 4; the agreed set is less uncertain.
    assert set_uncertainty(scores[:, chosen]) > set_uncertainty(scores[:, [0, 1, 2]])
    assert set_uncertainty(scores[:, [0, 1, 2]]) < 1e-3
    # No distance rule: 4 and 5 are both chosen (each is disputed against the agreed ones).
    assert {4, 5} <= set(select_candidates(scores, 3, texts, min_distance=0.0))
    # Too few distinct candidates: the near-duplicates fill the set, K always comes back.
    assert len(select_candidates(scores, 6, texts, min_distance=0.2)) == 6


def test_greedy_matches_brute_force_on_the_first_pair_and_each_step():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 8, generator=g, dtype=torch.float64) * 2
    info = pair_disagreement(scores)
    chosen = select_candidates(scores, 4)
    best = max(((i, j) for i in range(8) for j in range(i + 1, 8)), key=lambda ij: info[ij].item())
    assert set(chosen[:2]) == set(best)
    for step in range(2, 4):
        rest = [i for i in range(8) if i not in chosen[:step]]
        gains = {i: sum(info[i, c].item() for c in chosen[:step]) for i in rest}
        assert chosen[step] == max(rest, key=lambda i: gains[i])


def test_text_distance():
    assert text_distance("The cat sat", "the CAT sat") == 0.0
    assert text_distance("a b", "c d") == 1.0
    assert text_distance("a b c d", "a b c e") == pytest.approx(1 - 3 / 5)


def test_select_candidates_checks_k():
    with pytest.raises(ValueError, match=r"k must be in \[2, M=3\], got 4"):
        select_candidates(torch.zeros(2, 3), 4)


def list_pairs_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(40, 5, generator=g, dtype=torch.float64)  # (N, D)
    truth = torch.randn(5, generator=g, dtype=torch.float64)
    lists = []
    for j in range(10):  # lists of 4 texts, ordered by the true head
        ids = list(range(4 * j, 4 * j + 4))
        ids.sort(key=lambda i: -float(feats[i] @ truth))
        lists.append([(ids[a], ids[b]) for a in range(4) for b in range(a + 1, 4)])
    return feats, lists, truth


def test_bootstrap_heads_are_reproducible_and_differ_from_each_other():
    feats, lists, truth = list_pairs_case()
    a = bootstrap_probes(feats, lists, n_heads=5, l2=0.1, seed=7)
    b = bootstrap_probes(feats, lists, n_heads=5, l2=0.1, seed=7)
    c = bootstrap_probes(feats, lists, n_heads=5, l2=0.1, seed=8)
    assert a.shape == (5, 5) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # different resamples, different heads
    assert all(torch.nn.functional.cosine_similarity(h, truth, dim=0) > 0.5 for h in a)  # they learned the rule


def test_a_bootstrap_head_is_the_probe_on_its_resample():
    feats, lists, _ = list_pairs_case()
    heads = bootstrap_probes(feats, lists, n_heads=2, l2=0.1, seed=3)
    g = torch.Generator().manual_seed(3)
    everything = torch.tensor([p for pairs in lists for p in pairs])
    scale = float((feats[everything[:, 0]] - feats[everything[:, 1]]).pow(2).mean())
    for e in range(2):
        draw = torch.randint(len(lists), (len(lists),), generator=g).tolist()
        pairs = torch.tensor([p for j in draw for p in lists[j]])
        w, _ = fit_pairwise_probe(feats[pairs[:, 0]] - feats[pairs[:, 1]], 0.1 * scale)
        assert torch.allclose(heads[e], w)


def test_bootstrap_needs_pairs():
    with pytest.raises(ValueError, match="no ordered pairs to fit the heads on"):
        bootstrap_probes(torch.zeros(3, 2), [[], []], l2=1.0)


# ------------------------------------------------------------------ rlhfkit annotate --selection uncertainty


def test_annotate_selection_uncertainty_serves_sets_in_priority_order(tiny_lm, tmp_path, monkeypatch, capsys):
    """Through ``main(argv)`` on the tiny model: the heads are fit on the rankings already in the
    database, each pool set keeps K of M sampled candidates, and the app serves the sets highest
    uncertainty first. uvicorn's ``run`` is replaced by a TestClient session on the same app."""
    pytest.importorskip("fastapi")
    import uvicorn
    from fastapi.testclient import TestClient

    from rlhfkit.annotate.cli import main
    from rlhfkit.annotate.store import AnnotationStore
    from tests.conftest import wait_until

    db, prompts = tmp_path / "a.db", [f"Question number {i}: say something." for i in range(5)]
    store = AnnotationStore(db)
    token = store.add_user("alice")
    uid = store.user_by_name("alice").id
    for i in range(6):  # rankings made earlier, on typed prompts (not in the pool the app serves)
        prompt, _ = store.add_typed_prompt(f"Earlier question {i}?", uid)
        s = store.add_generation_set(prompt.id, "m", [f"yes {i}", f"no, because {i}", f"maybe {i} times"])
        store.add_ranking(s, uid, [(i + r) % 3 for r in range(3)])
    store.close()
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")

    seen: list[tuple[int, float, int]] = []

    def fake_run(self, sockets=None):
        app = self.config.app
        with TestClient(app) as client:
            headers = {"Authorization": f"Bearer {token}"}
            wait_until(lambda: app.state.store.count_untouched_pool_sets() >= len(prompts), 600, "the pool's sets")
            while (r := client.get("/api/next", headers=headers).json())["status"] == "ready":
                seen.append((r["set_id"], app.state.store.set_priority(r["set_id"]), len(r["responses"])))
                ranking = [[i] for i in range(len(r["responses"]))]
                assert client.post("/api/rankings", json={"set_id": r["set_id"], "ranking": ranking}, headers=headers)
                if len(seen) > len(prompts):
                    break

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    argv = ["--policy", str(tiny_lm), "--reward-model", str(tiny_lm), "--selection", "uncertainty"]
    argv += ["--prompts", str(tmp_path / "prompts.txt"), "--db", str(db), "--port", "0", "--cpu"]
    argv += ["--samples-per-prompt", "2", "--candidates", "4", "--ensemble-size", "4", "--max-new-tokens", "6"]
    argv += ["--prefetch", str(len(prompts)), "--annotators-per-set", "1", "--refit-every", "1000"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "uncertainty: 4 heads fit on 18 ranked pair(s) of the 6 ranking(s) in" in out
    assert len(seen) == len(prompts) and all(k == 2 for _, _, k in seen)
    priorities = [p for _, p, _ in seen]
    assert priorities == sorted(priorities, reverse=True) and priorities[0] > 0
    assert "--annotators-per-set" in (main(["--help"]) == 0 and capsys.readouterr().out)


class PickLast:
    """A stand-in selector: keeps the last K candidates, priority = the prompt's length."""

    def __init__(self):
        self.refreshed = 0

    def select(self, prompt, candidates, k):
        return list(range(len(candidates) - k, len(candidates))), float(len(prompt))

    def refresh(self):
        self.refreshed += 1
        return 0


def test_the_pregenerator_samples_m_keeps_the_selectors_k_and_stores_its_priority(tmp_path):
    from rlhfkit.annotate.generator import Pregenerator
    from rlhfkit.annotate.store import AnnotationStore

    class Counting:
        name = "count"

        def generate(self, prompt, k):
            return [f"{prompt} answer {i}" for i in range(k)]

    store = AnnotationStore(tmp_path / "a.db")
    store.add_prompts(["short", "a longer prompt"])
    pregen = Pregenerator(store, Counting(), 2, selector=PickLast(), candidates=5)
    s = store.get_set(pregen.generate_set(2))
    assert s.responses == ("a longer prompt answer 3", "a longer prompt answer 4")
    assert store.set_priority(s.id) == len("a longer prompt")
    with pytest.raises(ValueError, match="candidates=1 must be >= k=2"):
        Pregenerator(store, Counting(), 2, selector=PickLast(), candidates=1)
    store.close()


def test_the_ensemble_refits_on_new_rankings_and_reorders_the_waiting_sets(tiny_lm, tmp_path, caplog):
    from rlhfkit.annotate.selection import UncertaintySelector
    from rlhfkit.annotate.store import AnnotationStore
    from rlhfkit.models.reward import RewardModel

    store = AnnotationStore(tmp_path / "a.db")
    uid = store.add_user("alice") and store.user_by_name("alice").id
    selector = UncertaintySelector(
        RewardModel.from_pretrained(tiny_lm, max_length=32), store=store, n_heads=3, refit_every=2
    )
    with caplog.at_level("WARNING"):  # nothing ranked: the first K, priority 0, said once
        assert selector.select("p", ["a", "b c", "d e f"], 2) == ([0, 1], 0.0)
        assert selector.select("p", ["a", "b c", "d e f"], 2) == ([0, 1], 0.0)
    assert caplog.text.count("nothing ranked yet to fit the ensemble on") == 1

    store.add_prompts(["Why is the sky blue?", "Name a prime."])
    waiting = [store.add_generation_set(p, "m", ["yes", "no it is not", "maybe so"]) for p in (1, 2)]
    assert selector.refresh() == 0  # no new rankings since the last (empty) fit
    for i in range(2):
        prompt, _ = store.add_typed_prompt(f"Earlier question {i}?", uid)
        s = store.add_generation_set(prompt.id, "m", [f"yes {i}", f"no, because {i}", f"maybe {i} times"])
        store.add_ranking(s, uid, [0, 2, 1])
    assert selector.refresh() == 2 and selector.heads.shape[0] == 3
    for set_id in waiting:
        s = store.get_set(set_id)
        assert store.set_priority(set_id) == pytest.approx(set_uncertainty(selector._scores(s.prompt, s.responses)))
        assert store.set_priority(set_id) > 0
    store.close()
