"""Export formats for other toolkits (TRL/OpenRLHF pairs, a ``datasets`` folder), the consensus
of several annotators, and reading the folder back as ``--train``."""

from __future__ import annotations

import json
import random
from fractions import Fraction

import pytest

from rlhfkit.annotate.consensus import consensus_ranks, dense_ranks
from rlhfkit.annotate.store import HF_COLUMNS, AnnotationStore, NotFound, export_rankings
from rlhfkit.data.readers import read_preferences
from rlhfkit.data.types import DataFormatError
from rlhfkit.errors import UserError
from tests.conftest import separable_lists, step_losses

# ------------------------------------------------------------------ consensus


def consensus_brute_force(rankings):
    """The docstring's plain form: exact mean ranks, then the index of each mean's level."""
    k = len(rankings[0])
    means = [Fraction(sum(dense_ranks(r)[i] for r in rankings), len(rankings)) for i in range(k)]
    levels = sorted(set(means))
    return tuple(levels.index(m) for m in means)


def test_consensus_hand_computed():
    # One annotator: itself, made dense.
    assert consensus_ranks([[2, 0, 1]]) == (2, 0, 1)
    assert consensus_ranks([[0, 2, 2]]) == (0, 1, 1)
    # Two annotators swap the top two: means 0.5, 0.5, 2 -> a tie on top.
    assert consensus_ranks([[0, 1, 2], [1, 0, 2]]) == (0, 0, 1)
    # Three annotators: means 1/3, 2/3, 2 -> strict.
    assert consensus_ranks([[0, 1, 2], [1, 0, 2], [0, 1, 2]]) == (0, 1, 2)
    # A tie in the input: means (0+0)/2, (0+1)/2, (1+2)/2 -> 0, 0.5, 1.5.
    assert consensus_ranks([[0, 0, 1], [0, 1, 2]]) == (0, 1, 2)
    # Opposite orders cancel: everything ties.
    assert consensus_ranks([[0, 1, 2, 3], [3, 2, 1, 0]]) == (0, 0, 0, 0)
    # Gaps in the ranks do not change the meaning: [0, 5] is [0, 1].
    assert consensus_ranks([[0, 5], [1, 0]]) == (0, 0)


def test_consensus_refuses_mismatched_rankings():
    with pytest.raises(ValueError, match="at least one ranking"):
        consensus_ranks([])
    with pytest.raises(ValueError, match=r"same K responses, got lengths \[2, 3\]"):
        consensus_ranks([[0, 1], [0, 1, 2]])


@pytest.mark.parametrize("seed", range(3))
def test_consensus_matches_brute_force_on_random_rankings(seed):
    rng = random.Random(seed)
    for _ in range(300):
        k = rng.randint(1, 6)
        n = rng.randint(1, 5)
        rankings = [[rng.randint(0, k) for _ in range(k)] for _ in range(n)]  # ties and gaps
        got = consensus_ranks(rankings)
        assert got == consensus_brute_force(rankings)
        assert sorted(set(got)) == list(range(len(set(got))))  # dense


# ------------------------------------------------------------------ a store with two annotators on one set


@pytest.fixture
def store(tmp_path):
    s = AnnotationStore(tmp_path / "a.db")
    s.add_prompts(["Why is the sky blue?", "Name a colour.", "Say hi."])
    s.add_user("alice")
    s.add_user("bob")
    alice, bob = s.user_by_name("alice").id, s.user_by_name("bob").id
    s1 = s.add_generation_set(1, "m", ["Rayleigh.", "Because.", "Magic."])
    s2 = s.add_generation_set(2, "m", ["Blue.", "Green.", "Seven."])
    s3 = s.add_generation_set(3, "m", ["Go away.", "Hi!"])
    s.add_ranking(s1, alice, [0, 1, 2])
    s.add_ranking(s1, bob, [1, 0, 2])  # two annotators on one set
    s.add_ranking(s2, alice, [0, 0, 1])  # a tie
    s.add_ranking(s3, bob, [1, 0])
    yield s
    s.close()


SKY, COLOUR, HI = "Why is the sky blue?", "Name a colour.", "Say hi."
EVERY = [  # the store's rankings, oldest first, as (prompt, responses in the shown order, ranks)
    (SKY, ("Rayleigh.", "Because.", "Magic."), (0, 1, 2)),
    (SKY, ("Rayleigh.", "Because.", "Magic."), (1, 0, 2)),
    (COLOUR, ("Blue.", "Green.", "Seven."), (0, 0, 1)),
    (HI, ("Go away.", "Hi!"), (1, 0)),
]
CONSENSUS = [  # alice and bob swap the top two of the sky set: their means tie
    (SKY, ("Rayleigh.", "Because.", "Magic."), (0, 0, 1)),
    (COLOUR, ("Blue.", "Green.", "Seven."), (0, 0, 1)),
    (HI, ("Go away.", "Hi!"), (1, 0)),
]


def as_tuples(examples):
    return [(ex.prompt, ex.responses, ex.ranks) for ex in examples]


def pairs_of(lists):
    """(prompt, chosen, rejected) for every ordered pair i before j of each list, ties giving none."""
    return [
        (prompt, responses[i], responses[j])
        for prompt, responses, ranks in lists
        for i in range(len(ranks))
        for j in range(len(ranks))
        if ranks[i] < ranks[j]
    ]


# ------------------------------------------------------------------ pairs


@pytest.mark.parametrize(("aggregate", "lists", "n"), [("every", EVERY, 9), ("consensus", CONSENSUS, 5)])
def test_pairs_export_reads_back_as_the_ranked_pairs(store, tmp_path, aggregate, lists, n):
    path = tmp_path / "pairs.jsonl"
    assert export_rankings(store, path, "pairs", aggregate=aggregate) == n
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in records)  # TRL / OpenRLHF keys only
    got = [(ex.prompt, *ex.responses) for ex in read_preferences(path, format="pairs")]
    assert got == pairs_of(lists)
    assert all(ex.ranks == (0, 1) for ex in read_preferences(path, format="pairs"))
    if aggregate == "every":  # written out by hand for the sky set: alice's three pairs, then bob's
        assert got[:6] == [
            (SKY, "Rayleigh.", "Because."),
            (SKY, "Rayleigh.", "Magic."),
            (SKY, "Because.", "Magic."),
            (SKY, "Rayleigh.", "Magic."),
            (SKY, "Because.", "Rayleigh."),
            (SKY, "Because.", "Magic."),
        ]
    else:  # the tied top two of the consensus give no pair between them
        assert got[:2] == [(SKY, "Rayleigh.", "Magic."), (SKY, "Because.", "Magic.")]


def test_existing_formats_take_the_consensus_too(store, tmp_path):
    path = tmp_path / "c.jsonl"
    assert export_rankings(store, path, "jsonl", aggregate="consensus") == 3
    assert as_tuples(read_preferences(path, allow_ties=True)) == [
        (SKY, ("Rayleigh.", "Because.", "Magic."), (0, 0, 1)),
        (COLOUR, ("Blue.", "Green.", "Seven."), (0, 0, 1)),
        (HI, ("Hi!", "Go away."), (0, 1)),  # a strict list is written best first
    ]
    with pytest.raises(UserError, match="aggregate 'mean' is not supported; use one of every, consensus"):
        export_rankings(store, path, "jsonl", aggregate="mean")


def test_a_consensus_of_opposite_rankings_states_nothing_and_is_left_out(tmp_path):
    s = AnnotationStore(tmp_path / "b.db")
    s.add_prompts(["p"])
    s.add_user("alice")
    s.add_user("bob")
    set_id = s.add_generation_set(1, "m", ["x", "y"])
    s.add_ranking(set_id, s.user_by_name("alice").id, [0, 1])
    s.add_ranking(set_id, s.user_by_name("bob").id, [1, 0])
    with pytest.raises(NotFound, match=r"the 2 matching ranking\(s\) state no preference"):
        export_rankings(s, tmp_path / "x.jsonl", "jsonl", aggregate="consensus")
    assert export_rankings(s, tmp_path / "x.jsonl", "pairs") == 2
    s.close()


# ------------------------------------------------------------------ hf: a datasets folder


@pytest.mark.parametrize(("aggregate", "lists"), [("every", EVERY), ("consensus", CONSENSUS)])
def test_hf_export_round_trips_through_load_from_disk_and_the_reader(store, tmp_path, aggregate, lists):
    import datasets

    folder = tmp_path / "hf"
    assert export_rankings(store, folder, "hf", aggregate=aggregate) == len(lists)
    dataset = datasets.load_from_disk(str(folder))
    assert dataset.column_names == list(HF_COLUMNS)
    assert [(r["prompt"], tuple(r["responses"]), tuple(r["ranks"])) for r in dataset] == lists
    if aggregate == "every":
        assert dataset["annotator"] == ["alice", "bob", "alice", "bob"]
        assert dataset["annotators"] == [["alice"], ["bob"], ["alice"], ["bob"]]
        assert dataset["set_id"] == [1, 1, 2, 3]
    else:
        assert dataset["annotator"] == ["consensus", "alice", "bob"]
        assert dataset["annotators"] == [["alice", "bob"], ["alice"], ["bob"]]
        assert dataset["set_id"] == [1, 2, 3]
    assert as_tuples(read_preferences(folder, allow_ties=True)) == lists
    assert as_tuples(read_preferences(folder, format="ranked", allow_ties=True)) == lists
    # As every JSON format: ties only with allow_ties, and the error names the row.
    with pytest.raises(DataFormatError, match=rf"{folder}, row {3 if aggregate == 'every' else 1}: .*\(a tie\)"):
        read_preferences(folder)


def test_hf_export_replaces_its_own_folder_and_nothing_else(store, tmp_path):
    folder = tmp_path / "hf"
    export_rankings(store, folder, "hf")
    assert export_rankings(store, folder, "hf", aggregate="consensus") == 3  # replaced
    assert len(read_preferences(folder, allow_ties=True)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "a.db-shm", "a.db-wal", "hf"]  # no temp left
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"--output {other} is a folder that holds other files"):
        export_rankings(store, other, "hf")
    assert (other / "notes.txt").read_text() == "mine"


def test_cli_exports_pairs_and_hf(store, tmp_path, capsys):
    from rlhfkit.annotate.cli import main

    db = str(store.path)
    assert main(["export", "--db", db, "--format", "pairs", "--output", str(tmp_path / "p.jsonl")]) == 0
    assert "wrote 9 pair(s)" in capsys.readouterr().err
    folder = tmp_path / "hf"
    args = ["export", "--db", db, "--format", "hf", "--aggregate", "consensus", "--output", str(folder)]
    assert main(args) == 0
    assert f"wrote 3 list(s) to {folder} (a datasets folder" in capsys.readouterr().err
    assert as_tuples(read_preferences(folder, allow_ties=True)) == CONSENSUS
    (tmp_path / "file").write_text("x")
    assert main(["export", "--db", db, "--format", "hf", "--output", str(tmp_path / "file")]) == 2
    assert f"--output {tmp_path / 'file'} is a file; give a folder" in capsys.readouterr().err
    assert main(["export", "--db", db, "--aggregate", "median", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "median" in capsys.readouterr().err


# ------------------------------------------------------------------ reading a folder that is not a dataset


def test_folders_that_are_not_one_saved_dataset_are_refused(store, tmp_path):
    import datasets

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError, match="is a folder but not a dataset written by datasets' save_to_disk"):
        read_preferences(empty)
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["p"]})}).save_to_disk(str(splits))
    with pytest.raises(DataFormatError, match=r"is a DatasetDict folder \(splits: train\); pass one split's folder"):
        read_preferences(splits)
    broken = tmp_path / "broken"
    export_rankings(store, broken, "hf")
    (broken / "state.json").write_text("{")
    with pytest.raises(DataFormatError, match="could not be read by datasets.load_from_disk"):
        read_preferences(broken)
    with pytest.raises(DataFormatError, match="not rank-list TSV"):
        read_preferences(tmp_path / "splits" / "train", format="ranklist-tsv")
    odd = tmp_path / "odd"
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(odd))
    with pytest.raises(DataFormatError, match=rf"{odd}, row 1: has keys \['text'\], which match no known format"):
        read_preferences(odd)


def test_rm_train_exits_2_on_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    from rlhfkit.cli import main

    (tmp_path / "data").mkdir()
    assert main(["rm", "train", "--train", str(tmp_path / "data"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is a folder but not a dataset written by datasets' save_to_disk" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ rm train, dpo and the pipeline read the folder


@pytest.fixture
def hf_folder(tmp_path):
    """An exported folder of 8 three-response lists (two annotators, one tie) to train on."""
    s = AnnotationStore(tmp_path / "train.db")
    s.add_user("alice")
    s.add_user("bob")
    alice, bob = s.user_by_name("alice").id, s.user_by_name("bob").id
    lists = separable_lists(6, k=3, seed=1)
    s.add_prompts([f"prompt {i}" for i in range(len(lists))])
    for i, responses in enumerate(lists, start=1):  # best first
        set_id = s.add_generation_set(i, "m", responses)
        s.add_ranking(set_id, alice, [0, 1, 2] if i != 2 else [0, 0, 1])
        if i <= 2:
            s.add_ranking(set_id, bob, [0, 2, 1])
    folder = tmp_path / "hf"
    assert export_rankings(s, folder, "hf") == 8
    s.close()
    return folder


def test_rm_train_reads_an_exported_folder(tiny_lm, hf_folder, tmp_path, capsys):
    from rlhfkit.cli import main

    out = tmp_path / "rm"
    args = ["rm", "train", "--model", str(tiny_lm), "--train", str(hf_folder), "--allow-ties", "--output", str(out)]
    rc = main([*args, "--max-steps", "1", "--batch-size", "4", "--no-progress", "--report-to", "none"])
    assert rc == 0, capsys.readouterr().err
    assert len(step_losses(out)) == 1 and (out / "final").is_dir()


def test_dpo_reads_an_exported_folder(tiny_lm, hf_folder, tmp_path, capsys):
    from rlhfkit.cli import main

    out = tmp_path / "dpo"
    args = ["dpo", "--policy", str(tiny_lm), "--train", str(hf_folder), "--allow-ties", "--output", str(out)]
    rc = main(
        [
            *args,
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--eval-kl-prompts",
            "0",
            "--no-progress",
            "--report-to",
            "none",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert len(step_losses(out)) == 1 and (out / "final").is_dir()


def test_pipeline_takes_an_exported_folder_as_its_preference_file(hf_folder, tmp_path, monkeypatch):
    from rlhfkit.cli import main
    from rlhfkit.pipeline.run import Runner

    class Stop(Exception):
        pass

    real_stage = Runner.stage

    def preferences_only(self, name, config, run):
        if name != "preferences":
            raise Stop(name)
        return real_stage(self, name, config, run)

    monkeypatch.setattr(Runner, "stage", preferences_only)
    config = tmp_path / "pipeline.yaml"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a prompt\n")
    config.write_text(f"""
output: {tmp_path / "pipe"}
sft: {{skip: true}}
preferences: {{source: file, file: {hf_folder}, allow_ties: true}}
rl: {{prompts: {prompts}, max_steps: 1}}
""")
    with pytest.raises(Stop, match="reward_model"):
        main(["pipeline", "--config", str(config)])
    copied = read_preferences(tmp_path / "pipe" / "preferences" / "preferences.jsonl", allow_ties=True)
    # The stage writes strict lists best first: compare (prompt, (rank, response) pairs).
    canonical = [
        (ex.prompt, sorted(zip(ex.ranks, ex.responses))) for ex in read_preferences(hf_folder, allow_ties=True)
    ]
    assert [(ex.prompt, sorted(zip(ex.ranks, ex.responses))) for ex in copied] == canonical
