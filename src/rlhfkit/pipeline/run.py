"""``rlhfkit pipeline CONFIG.yaml``: SFT -> preferences -> reward model -> PPO -> evaluation -> report.

Each stage writes into its own folder under ``output`` and a ``stage.json`` when it
completes, holding a hash of its configuration and of every stage it depends on. On the
next run a completed stage with the same hash is skipped; an interrupted one with the same
hash is resumed from its checkpoint; a changed one is run again from scratch (and so is
everything downstream, whose hashes change with it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhfkit.config import ConfigError, from_dict

logger = logging.getLogger(__name__)

STAGES = ("sft", "preferences", "reward_model", "ppo", "evaluation")


@dataclass
class PipelineConfig:
    """Run the whole RLHF pipeline from one YAML file (every section optional)."""

    output: str = field(default="", metadata={"help": "pipeline folder: one sub-folder per stage, report.html, report.md"})
    policy: str = field(default="smollm2-135m", metadata={"help": "starting policy (and SFT base): alias, folder or hub id"})
    title: str = field(default="RLHF pipeline", metadata={"help": "report title"})
    sft: dict = field(default_factory=dict, metadata={"help": "rlhfkit sft options (model/output are filled in); skip: true to skip"})
    preferences: dict = field(default_factory=dict, metadata={"help": "source: simulated | file; see the README"})
    reward_model: dict = field(default_factory=dict, metadata={"help": "rlhfkit rm train options (train/output filled in)"})
    ppo: dict = field(default_factory=dict, metadata={"help": "rlhfkit ppo options (policy/reward/output filled in)"})
    evaluation: dict = field(default_factory=dict, metadata={"help": "rlhfkit ppo-eval options (policy/reference/reward filled in)"})
    force: list[str] = field(default_factory=list, metadata={"help": "stages to re-run even if complete"})

    def __post_init__(self):
        if not self.output:
            raise ConfigError("option 'output' is required: the pipeline folder")
        unknown = [s for s in self.force if s not in STAGES]
        if unknown:
            raise ConfigError(f"option 'force': unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
        src = self.preferences.get("source", "simulated")
        if src not in ("simulated", "file"):
            raise ConfigError(f"preferences.source got {src!r}; choose simulated or file")
        if src == "file" and not self.preferences.get("file"):
            raise ConfigError("preferences.source is 'file' but preferences.file is not set")
        if not self.ppo.get("skip") and not self.ppo.get("prompts"):
            raise ConfigError("ppo.prompts is required: a prompt file for PPO rollouts")


PREFERENCE_KEYS = {"labeller", "source", "file", "format", "prompt_column", "allow_ties", "prompts", "n_prompts", "k", "max_new_tokens",
                   "temperature", "top_p", "chat_template", "seed", "skip", "batch_size"}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    folder: Path
    skipped_by_user: bool = False
    reused: bool = False
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)


class Runner:
    """Run stages with completion markers, so a pipeline can stop and start again."""

    def __init__(self, out: Path, force: list[str]):
        self.out = out
        self.force = set(force)
        self.results: dict[str, StageResult] = {}

    def stage(self, name: str, config: dict, run: Callable[[Path, bool], dict]) -> StageResult:
        folder = self.out / name
        marker = folder / "stage.json"
        digest = _hash(config)
        if marker.is_file() and name not in self.force:
            done = json.loads(marker.read_text())
            if done.get("hash") == digest:
                logger.warning("stage %s: complete with the same config, reusing %s", name, folder)
                res = StageResult(name, folder, reused=True, seconds=done.get("seconds", 0.0), summary=done.get("summary", {}))
                self.results[name] = res
                return res
        resume = False
        if folder.exists():
            from rlhfkit.checkpoint import find_checkpoint

            started = folder / "stage.started.json"
            same = started.is_file() and json.loads(started.read_text()).get("hash") == digest
            if same and name not in self.force and not marker.is_file() and find_checkpoint(folder) is not None:
                resume = True
                logger.warning("stage %s: resuming an interrupted run from %s", name, find_checkpoint(folder))
            else:  # changed, forced, or stopped before its first checkpoint: start it afresh
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "stage.started.json").write_text(json.dumps({"hash": digest, "config": config}, default=str, indent=2))
        print(f"\n=== stage {name} ===", flush=True)
        t0 = time.time()
        summary = run(folder, resume)
        seconds = time.time() - t0
        marker.write_text(json.dumps({"hash": digest, "seconds": seconds, "summary": summary}, default=str, indent=2))
        res = StageResult(name, folder, seconds=seconds, summary=summary)
        self.results[name] = res
        return res


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage that is not complete, then write report.html and report.md."""
    from rlhfkit.pipeline.report import write_report

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out, cfg.force)
    t_start = time.time()

    # 1. SFT --------------------------------------------------------------------------------
    sft_opts = dict(cfg.sft)
    policy = cfg.policy
    if not sft_opts.pop("skip", False):
        from rlhfkit.sft.train import SFTConfig, train_sft

        sft_cfg_dict = {"model": cfg.policy, **sft_opts}

        def run_sft(folder: Path, resume: bool) -> dict:
            from rlhfkit.sft.data import read_sft_data

            sft_cfg = from_dict(SFTConfig, {**sft_cfg_dict, "output": str(folder), "resume": resume}, where="pipeline sft")
            return {"n_train_examples": len(read_sft_data(sft_cfg.train)), **_plain(train_sft(sft_cfg))}

        _validate(SFTConfig, {**sft_cfg_dict, "output": "x"}, "sft")
        res = runner.stage("sft", {"config": sft_cfg_dict}, run_sft)
        policy = str(res.folder / "final")
    upstream = {"policy": policy, "sft": _marker_hash(runner, "sft")}

    # 2. preferences ------------------------------------------------------------------------
    prefs = dict(cfg.preferences)
    unknown = sorted(set(prefs) - PREFERENCE_KEYS)
    if unknown:
        raise ConfigError(f"pipeline preferences: unknown option(s) {unknown}; valid: {', '.join(sorted(PREFERENCE_KEYS))}")
    source = prefs.get("source", "simulated")

    def run_prefs(folder: Path, resume: bool) -> dict:
        if source == "file":
            from rlhfkit.data.readers import describe, read_preferences

            examples = read_preferences(prefs["file"], format=prefs.get("format", "auto"),
                                        prompt_column=bool(prefs.get("prompt_column", False)), allow_ties=bool(prefs.get("allow_ties", False)))
            from rlhfkit.data.writers import write_preferences

            write_preferences(folder / "preferences.jsonl", examples, "ranked")
            return {"source": f"file {prefs['file']}", **_plain(describe(examples))}
        return _simulate_preferences(policy, prefs, folder)

    res = runner.stage("preferences", {"prefs": prefs, **upstream}, run_prefs)
    pref_file = str(res.folder / "preferences.jsonl")
    upstream["preferences"] = _marker_hash(runner, "preferences")

    # 3. reward model -----------------------------------------------------------------------
    from rlhfkit.rm.train import RMTrainConfig, train_reward_model

    rm_dict = {"model": policy, "eval_fraction": 0.2, "allow_ties": True, **cfg.reward_model, "train": pref_file}
    _validate(RMTrainConfig, {**rm_dict, "output": "x"}, "reward_model")

    def run_rm(folder: Path, resume: bool) -> dict:
        rm_cfg = from_dict(RMTrainConfig, {**rm_dict, "output": str(folder), "resume": resume}, where="pipeline reward_model")
        return _plain(train_reward_model(rm_cfg))

    res = runner.stage("reward_model", {"config": rm_dict, **upstream}, run_rm)
    reward = str(res.folder)
    upstream["reward_model"] = _marker_hash(runner, "reward_model")

    # 4. PPO ----------------------------------------------------------------------------------
    ppo_opts = dict(cfg.ppo)
    final_policy = policy
    if not ppo_opts.pop("skip", False):
        from rlhfkit.ppo.trainer import PPOConfig, train_ppo

        ppo_dict = {**ppo_opts, "policy": policy, "reward": reward}
        _validate(PPOConfig, {**ppo_dict, "output": "x"}, "ppo")

        def run_ppo(folder: Path, resume: bool) -> dict:
            from rlhfkit.ppo.rollout import read_prompts

            ppo_cfg = from_dict(PPOConfig, {**ppo_dict, "output": str(folder), "resume": resume}, where="pipeline ppo")
            return {"n_prompts": len(read_prompts(ppo_cfg.prompts)), **_plain(train_ppo(ppo_cfg))}

        res = runner.stage("ppo", {"config": ppo_dict, **upstream}, run_ppo)
        final_policy = str(res.folder / "policy")
        upstream["ppo"] = _marker_hash(runner, "ppo")

    # 5. evaluation ---------------------------------------------------------------------------
    ev_opts = dict(cfg.evaluation)
    if not ev_opts.pop("skip", False) and final_policy != policy:
        from rlhfkit.ppo.commands import PPOEvalConfig, run_ppo_eval

        ev_dict = {"prompts": cfg.ppo.get("prompts"), **ev_opts, "policy": final_policy, "reference": policy, "reward": reward}
        _validate(PPOEvalConfig, ev_dict, "evaluation")

        def run_ev(folder: Path, resume: bool) -> dict:
            report = run_ppo_eval(from_dict(PPOEvalConfig, {**ev_dict, "output": str(folder)}, where="pipeline evaluation"))
            return _plain({k: v for k, v in report.items() if k != "plot"})

        runner.stage("evaluation", {"config": ev_dict, **upstream}, run_ev)

    paths = write_report(cfg, runner.results, out, total_seconds=time.time() - t_start)
    return {"report_html": str(paths[0]), "report_md": str(paths[1]), "stages": {k: v.summary for k, v in runner.results.items()},
            "summary": paths[2]}


def _simulate_preferences(policy: str, prefs: dict, folder: Path) -> dict:
    """Sample K answers per prompt from the policy and let the scripted labeller rank them."""
    from rlhfkit.data.readers import describe
    from rlhfkit.data.writers import write_preferences
    from rlhfkit.generation import load_policy, sample_responses
    from rlhfkit.pipeline.simulated import NAME, rank_samples
    from rlhfkit.ppo.rollout import read_prompts

    if not prefs.get("prompts"):
        raise ConfigError("preferences.prompts is required for the simulated annotator (a prompt file)")
    prompts = [p.text if hasattr(p, "text") else str(p) for p in read_prompts(prefs["prompts"])]
    prompts = prompts[: int(prefs.get("n_prompts", len(prompts)))]
    k = int(prefs.get("k", 4))
    model, tokenizer = load_policy(policy)
    samples = sample_responses(
        model, tokenizer, prompts, k, max_new_tokens=int(prefs.get("max_new_tokens", 48)),
        temperature=float(prefs.get("temperature", 1.0)), top_p=float(prefs.get("top_p", 1.0)),
        use_chat_template=bool(prefs.get("chat_template", True)), seed=int(prefs.get("seed", 0)),
        batch_size=int(prefs.get("batch_size", 16)),
    )
    rule, name = None, NAME
    if prefs.get("labeller"):  # any rule f(prompts, responses) -> scores, as 'module:function'
        from rlhfkit.ppo.reward_sources import FunctionSource

        rule = FunctionSource(str(prefs["labeller"]))
        name = f"simulated annotator (rule {prefs['labeller']})"
    examples, stats = rank_samples(prompts, samples, rule)
    if not examples:
        raise RuntimeError("the simulated annotator found no preference in any list; sample more prompts or longer answers")
    write_preferences(folder / "preferences.jsonl", examples, "ranked")
    (folder / "samples.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "responses": s}, ensure_ascii=False) + "\n" for p, s in zip(prompts, samples)), encoding="utf-8"
    )
    return {"source": name, "k": k, **vars(stats), **_plain(describe(examples))}


def _validate(cls, values: dict, section: str) -> None:
    """Build the stage's config once up front, so a typo fails before hours of earlier stages."""
    try:
        from_dict(cls, values, where=f"pipeline {section}")
    except ConfigError as e:
        raise ConfigError(str(e)) from None


def _marker_hash(runner: Runner, name: str) -> str | None:
    res = runner.results.get(name)
    if res is None:
        return None
    marker = res.folder / "stage.json"
    return json.loads(marker.read_text()).get("hash") if marker.is_file() else None


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
