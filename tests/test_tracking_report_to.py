"""``--report-to``: each tracker, in its offline or local mode, gets a run's config once and
the rows of its ``metrics.jsonl`` (same steps, same values), on short ``rm train`` and
``rl --algo grpo`` runs of the tiny models; and the option's errors, the missing-package exit,
``none``, the deprecated ``--no-tensorboard`` and the pipeline's top-level value.

Each tracker test skips when its package is not installed (``pip install 'rlhfkit[wandb]'``
and likewise for ``mlflow`` and ``trackio``)."""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from rlhfkit.cli import main
from rlhfkit.config import ConfigError, from_dict
from rlhfkit.tracking import flat_config, parse_report_to, read_metrics
from rlhfkit.training.options import check_resume_matches
from tests.conftest import WORDS, separable_lists, write_rl_files

TRACKERS = ("wandb", "mlflow", "trackio")


@pytest.fixture(scope="session")
def trackio_dir(tmp_path_factory) -> Path:
    """trackio reads TRACKIO_DIR once, when it is first imported: point it at a temporary
    folder before that, so the tests never write into the user's Hugging Face cache."""
    if "trackio" not in sys.modules:
        os.environ["TRACKIO_DIR"] = str(tmp_path_factory.mktemp("trackio"))
    pytest.importorskip("trackio")
    import trackio.utils

    if not str(trackio.utils.TRACKIO_DIR).startswith(str(tmp_path_factory.getbasetemp())):
        pytest.skip(f"trackio was imported before these tests, with its store at {trackio.utils.TRACKIO_DIR}")
    return trackio.utils.TRACKIO_DIR


@pytest.fixture(autouse=True)
def local_trackers(monkeypatch, tmp_path):
    """Every tracker offline or local, quiet, and free of the developer's own settings."""
    for var in (
        "WANDB_DIR",
        "WANDB_PROJECT",
        "WANDB_NAME",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
        "WANDB_API_KEY",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_RUN_ID",
        "MLFLOW_TAGS",
        "MLFLOW_NESTED_RUN",
        "TRACKIO_SPACE_ID",
        "TRACKIO_SERVER_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "tracker-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's captured stdout alone
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv(
        "TRACKIO_PROJECT", f"rlhfkit-test-{uuid.uuid4().hex[:8]}"
    )  # one project per test: its runs alone


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report-to")
    lists = root / "lists.tsv"
    lists.write_text("\n".join("\t".join(r) for r in separable_lists(40)) + "\n", encoding="utf-8")
    rng = random.Random(0)
    prompts, rewards = write_rl_files(root, [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(16)])
    return {"lists": lists, "prompts": prompts, "rewards": rewards}


def rm_train(tiny_lm, files, out: Path, *extra: str) -> list[str]:
    """3 steps, a row each, an evaluation at steps 2 and 3."""
    return [
        "rm",
        "train",
        "--model",
        str(tiny_lm),
        "--train",
        str(files["lists"]),
        "--n-train",
        "32",
        "--output",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--eval-every",
        "2",
        "--no-progress",
        "--cpu",
        *extra,
    ]


def grpo(tiny_lm, files, out: Path, *extra: str) -> list[str]:
    return [
        "rl",
        "--algo",
        "grpo",
        "--policy",
        str(tiny_lm),
        "--reward",
        f"{files['rewards']}:share_lower",
        "--prompts",
        str(files["prompts"]),
        "--output",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--samples-per-prompt",
        "2",
        "--mini-batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--log-every",
        "1",
        "--sample-every",
        "0",
        "--no-progress",
        "--cpu",
        *extra,
    ]


# ----------------------------------------------------------------- reading each tracker back
def wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` file: a 7-byte header, then LevelDB-log
    blocks of 32 KiB whose chunks (7-byte header: crc32, length, type) join into protobuf
    ``Record`` messages (type 1: whole, 2-3-4: first, middle, last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if space < 7 or kind == 0:  # the block's zero padding
            pos += space
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def read_wandb(out: Path) -> tuple[list[dict], dict[str, dict[int, float]]]:
    """(the config updates the run logged, {metric: {step: value}}) of the one offline run in OUT/wandb."""
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # WANDB_DIR defaults to the run folder
    configs, history = [], {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            update = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.config.update
            }
            if any(not k.startswith("_") for k in update):  # wandb's own bookkeeping keys start with _
                configs.append(update)
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
        elif kind == "run":
            assert record.run.project == "rlhfkit" and record.run.display_name == out.name
    return configs, history


def read_mlflow(out: Path) -> tuple[list[dict], dict[str, dict[int, float]]]:
    from mlflow.tracking import MlflowClient

    assert "MLFLOW_TRACKING_URI" not in os.environ  # the run's default URI was taken back when it closed
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")  # the default store: in the run folder
    (run,) = client.search_runs([client.get_experiment_by_name("rlhfkit").experiment_id])
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    history = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in run.data.metrics
    }
    return [run.data.params], history


def read_trackio(out: Path) -> tuple[list[dict], dict[str, dict[int, float]]]:
    from trackio.sqlite_storage import SQLiteStorage

    project = os.environ["TRACKIO_PROJECT"]
    assert SQLiteStorage.get_runs(project) == [out.name]
    config = {k: v for k, v in SQLiteStorage.get_run_config(project, out.name).items() if not k.startswith("_")}
    history: dict[str, dict[int, float]] = {}
    for row in SQLiteStorage.get_logs(project, out.name):
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                history.setdefault(key, {})[row["step"]] = value
    return [config], history


READERS = {"wandb": read_wandb, "mlflow": read_mlflow, "trackio": read_trackio}


def assert_tracker_matches_the_run(tracker: str, out: Path, keys: tuple[str, ...]) -> None:
    """The tracker holds the run's config, logged once, and the same (step, value) pairs as
    metrics.jsonl for each of ``keys``."""
    configs, history = READERS[tracker](out)
    config = flat_config(yaml.safe_load((out / "config.yaml").read_text()))
    assert len(configs) == 1, configs
    logged = configs[0]
    if tracker == "mlflow":  # mlflow keeps every parameter as a string
        config = {k: str(v) for k, v in config.items()}
    assert logged == config
    rows = read_metrics(out / "metrics.jsonl")
    for key in keys:
        expected = {r["step"]: r[key] for r in rows if key in r}
        assert len(expected) >= 2, (key, rows)
        assert history[key] == pytest.approx(expected), key


# ----------------------------------------------------------------- one tracker at a time
@pytest.mark.parametrize("tracker", TRACKERS)
def test_rm_train_reports_config_once_and_the_metrics(tracker, tiny_lm, files, tmp_path, request):
    request.getfixturevalue("trackio_dir") if tracker == "trackio" else pytest.importorskip(tracker)
    out = tmp_path / f"rm-{tracker}"
    assert main(rm_train(tiny_lm, files, out, "--report-to", tracker)) == 0
    assert_tracker_matches_the_run(tracker, out, ("train/loss", "eval/pairwise_accuracy"))
    assert not (out / "tensorboard").exists()  # the default is replaced, not added to


@pytest.mark.parametrize("tracker", TRACKERS)
def test_grpo_reports_config_once_and_the_metrics(tracker, tiny_lm, files, tmp_path, request):
    request.getfixturevalue("trackio_dir") if tracker == "trackio" else pytest.importorskip(tracker)
    out = tmp_path / f"grpo-{tracker}"
    assert main(grpo(tiny_lm, files, out, "--report-to", tracker)) == 0
    assert_tracker_matches_the_run(tracker, out, ("rl/score_mean", "rl/entropy"))


def test_three_trackers_and_tensorboard_in_one_run(tiny_lm, files, tmp_path, trackio_dir):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    out = tmp_path / "all"
    assert main(rm_train(tiny_lm, files, out, "--report-to", "wandb,mlflow,trackio,tensorboard")) == 0
    for tracker in TRACKERS:
        assert_tracker_matches_the_run(tracker, out, ("train/loss", "eval/loss"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    (hparams,) = (out / "tensorboard").glob("*/hparams.yml")  # the config, once
    assert yaml.safe_load(hparams.read_text()) == flat_config(yaml.safe_load((out / "config.yaml").read_text()))


def test_a_run_that_raises_finishes_its_tracker_as_failed(tiny_lm, files, tmp_path, monkeypatch):
    """No Run.close: the next run's metrics log (or the process's exit) ends the run, as failed."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    import rlhfkit.rm.train as rm_train_module
    from rlhfkit.tracking import MetricsLogger

    def broken_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(rm_train_module, "evaluate_and_keep_best", broken_evaluation)
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="evaluation broke"):
        main(rm_train(tiny_lm, files, out, "--report-to", "mlflow"))
    MetricsLogger(tmp_path / "next", report_to=["none"]).close()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("rlhfkit").experiment_id])
    assert run.info.status == "FAILED"
    assert "MLFLOW_TRACKING_URI" not in os.environ


# ----------------------------------------------------------------- none, errors, the old switch
def test_none_writes_only_metrics_jsonl(tiny_lm, files, tmp_path):
    out = tmp_path / "none"
    assert main(rm_train(tiny_lm, files, out, "--report-to", "none")) == 0
    assert len(read_metrics(out / "metrics.jsonl")) >= 3
    assert not [p.name for p in out.iterdir() if p.name in ("tensorboard", "wandb", "mlflow.db", "mlartifacts")]


@pytest.mark.parametrize(
    "value, message",
    [
        (
            "wandb,tensorbord",
            r"option --report-to got 'wandb,tensorbord': unknown tracker 'tensorbord'; choose from "
            r"tensorboard, wandb, mlflow, trackio or none",
        ),
        (
            "none,wandb",
            r"option --report-to got 'none,wandb': 'none' means no tracker, so it cannot be combined with others",
        ),
    ],
)
def test_a_bad_report_to_exits_2_before_anything_is_written(value, message, tiny_lm, files, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(rm_train(tiny_lm, files, out, "--report-to", value)) == 2
    assert message.replace("\\", "") in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ConfigError, match=message):
        from_dict_rm(files, tmp_path, report_to=value)


def test_a_config_built_in_python_takes_report_to_as_a_plain_string():
    """``report_to="none"`` in a dataclass built in Python is one value, not four letters (the
    benchmarks build configs so; it was refused as 'n,o,n,e')."""
    assert parse_report_to("none") == ["none"]
    assert parse_report_to("wandb, mlflow") == ["wandb", "mlflow"]
    assert parse_report_to(["tensorboard", "wandb,tensorboard"]) == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="option --report-to got 'wandb,tensorbord': unknown tracker 'tensorbord'"):
        parse_report_to("wandb,tensorbord")


@pytest.mark.parametrize("tracker", TRACKERS)
def test_a_tracker_not_installed_exits_2_naming_the_extra(tracker, tiny_lm, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` now raises ImportError
    out = tmp_path / "missing"
    assert main(rm_train(tiny_lm, files, out, "--report-to", f"tensorboard,{tracker}")) == 2
    err = capsys.readouterr().err
    assert (
        f"option --report-to {tracker}: the {tracker} package is not installed; install it with "
        f"pip install 'rlhfkit[{tracker}]'" in err
    )
    assert not out.exists()


def from_dict_rm(files, tmp_path, **kw):
    from rlhfkit.rm.train import RMTrainConfig

    return from_dict(
        RMTrainConfig, {"model": "tiny", "train": str(files["lists"]), "output": str(tmp_path / "cfg"), **kw}
    )


def test_no_tensorboard_still_works_with_a_deprecation_warning(files, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(
        "rlhfkit.training.options.check_installed", lambda names: None
    )  # parsing only: no tracker needed
    with caplog.at_level("WARNING"):
        cfg = from_dict_rm(files, tmp_path, tensorboard=False)
    assert cfg.report_to == ["none"] and cfg.tensorboard is None
    assert "--no-tensorboard is deprecated; use --report-to (this run: --report-to none)" in caplog.text
    assert from_dict_rm(files, tmp_path, report_to="wandb,tensorboard", tensorboard=False).report_to == ["wandb"]
    assert from_dict_rm(files, tmp_path, report_to=["mlflow", "wandb,mlflow"]).report_to == ["mlflow", "wandb"]
    assert from_dict_rm(files, tmp_path).report_to == ["tensorboard"]  # the default, as before


def test_resume_may_change_the_trackers():
    saved = {"lr": 1e-3, "report_to": ["tensorboard"], "tensorboard": True}
    assert check_resume_matches(saved, {"lr": 1e-3, "report_to": ["wandb"], "tensorboard": None}) == []
    assert check_resume_matches(saved, {"lr": 2e-3, "report_to": ["wandb"], "tensorboard": None}) == ["lr"]


def test_pipeline_stages_inherit_report_to_unless_their_section_sets_it(files, tmp_path):
    from rlhfkit.pipeline.run import PipelineConfig, _options

    sft = tmp_path / "sft.jsonl"  # the pipeline reads every section's files when its config is built
    sft.write_text('{"prompt": "q", "response": "a"}\n')
    cfg = from_dict(
        PipelineConfig,
        {
            "output": str(tmp_path / "pipe"),
            "policy": "tiny",
            "report_to": "none",
            "algorithm": ["grpo", "dpo"],
            "sft": {"train": str(sft)},
            "preferences": {"source": "file", "file": str(files["lists"])},
            "reward_model": {"report_to": "tensorboard"},
            "rl": {"prompts": str(files["prompts"])},
        },
    )
    configs = cfg.stage_configs()
    assert {name: configs[name].report_to for name in ("sft", "reward_model", "grpo", "dpo")} == {
        "sft": ["none"],
        "reward_model": ["tensorboard"],
        "grpo": ["none"],
        "dpo": ["none"],
    }
    assert "report_to" not in _options(configs["grpo"])  # changing trackers re-runs no stage
