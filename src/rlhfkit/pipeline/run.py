"""``rlhfkit pipeline --config CONFIG.yaml``: SFT -> preferences -> reward model -> PPO (or RLOO, GRPO,
REINFORCE++, DPO) -> evaluation -> report.

Every section of the YAML is the options of its command, checked when the config is built,
before the first stage runs: each stage's config is made up front with the folders the
pipeline will fill in (a typo or a bad value in the last section fails in a second, not
after an hour of SFT). Each stage writes into its own folder under ``output`` and a
``stage.json`` when it completes, holding a hash of its configuration and of every stage
it depends on. On the next run a completed stage with the same hash is skipped; an
interrupted one with the same hash is resumed from its checkpoint; a changed one is run
again from scratch (and so is everything downstream, whose hashes change with it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.checkpoint import export_pretrained, find_checkpoint
from rlhfkit.config import ConfigError, Options, from_dict, opt, require
from rlhfkit.data.instructions import read_sft_data
from rlhfkit.data.prompts import read_prompts
from rlhfkit.data.readers import FORMATS, describe, is_saved_dataset, read_preferences
from rlhfkit.data.writers import write_preferences
from rlhfkit.defaults import EXPORT, MAX_NEW_TOKENS, RL_ALGORITHMS
from rlhfkit.dpo.train import DPOConfig, train_dpo
from rlhfkit.errors import MissingFileError, UserError
from rlhfkit.files import check_output_dir
from rlhfkit.judge.commands import EvalConfig, run_checkpoint_eval, run_eval
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.hub import resolve_model
from rlhfkit.models.policy import inference_dtype, load_policy
from rlhfkit.models.policy_info import POLICY_INFO
from rlhfkit.models.snapshots import list_snapshots, load_snapshot
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.pipeline.report import write_report
from rlhfkit.pipeline.rounds import TOKEN_ENV, collect_round, make_team, open_app, read_round_prompts, round_prompts
from rlhfkit.pipeline.simulated import DEFAULT_TEAM, NAME, lexicon_reward, rank_samples
from rlhfkit.rl.commands import PPOEvalConfig, run_ppo_eval
from rlhfkit.rl.reward_sources import FunctionSource
from rlhfkit.rl.trainer import RLConfig, train_rl
from rlhfkit.rm.train import RMTrainConfig, train_reward_model
from rlhfkit.sampling import SamplingSettings, sample_texts
from rlhfkit.sft.train import SFTConfig, train_sft
from rlhfkit.training.lock import RunLock

logger = logging.getLogger(__name__)

ONLINE = RL_ALGORITHMS  # rlhfkit rl --algo
ALGORITHMS = (*ONLINE, "dpo")  # dpo trains on the preferences directly: no reward model, no sampling
STAGES = ("sft", "preferences", "reward_model", *ALGORITHMS, "evaluation", "judge")


@dataclass(kw_only=True)
class PreferencesConfig(Options):
    """Where the preference data comes from: a file, or a simulated annotator ranking the policy's samples."""

    source: Literal["simulated", "file", "annotate"] = opt(
        "simulated",
        "file: read --file; simulated: sample and rank with a scripted rule (with rounds: a simulated team of "
        "annotators in the app); annotate: people rank in the annotation app (rounds only)",
    )
    file: str | None = opt(
        None, "source file: preference data in any format 'rlhfkit rm train' reads (or a save_to_disk folder)"
    )
    format: Literal[FORMATS] = opt("auto", "source file: data format")  # type: ignore[valid-type]
    prompt_column: bool = opt(False, "source file: rank-list TSV whose first column is the prompt")
    allow_ties: bool = opt(False, "source file: accept equal ranks")
    prompts: str | None = opt(None, "simulated: prompt file")
    n_prompts: int | None = opt(None, "simulated: use the first N prompts", ge=1)
    samples_per_prompt: int = opt(4, "simulated: responses sampled and ranked per prompt", ge=2, was=("k",))
    max_new_tokens: int = opt(MAX_NEW_TOKENS, "simulated: response length limit", ge=1)
    temperature: float = opt(1.0, "simulated: sampling temperature", gt=0)
    top_p: float = opt(1.0, "simulated: nucleus filter", gt=0, le=1)
    chat_template: bool | None = opt(
        None, "simulated: render prompts with the chat template (default: when the tokenizer has one)"
    )
    seed: int = opt(42, "simulated: sampling seed")
    batch_size: int = opt(16, "simulated: sequences per generate call", ge=1)
    labeller: str | None = opt(None, "simulated: the ranking rule as module:function (default: the sentiment lexicon)")
    quota: int | None = opt(None, "rounds: rankings to collect per round (default: one per prompt of the round)", ge=1)
    candidates: int | None = opt(
        None,
        "rounds: responses sampled per prompt, of which the selection keeps samples_per_prompt (default: "
        "samples_per_prompt)",
        ge=2,
    )
    selection: Literal["random", "uncertainty"] = opt(
        "random",
        "rounds: which candidates to show and which sets first: random, or uncertainty (those the last round's "
        "reward-model ensemble disputes most)",
    )
    aggregate: Literal["every", "consensus", "weighted"] = opt(
        "weighted",
        "rounds: what the reward model trains on: every ranking, the consensus of each set's rankings, or every "
        "ranking weighted by its annotator's agreement with the others (the default: docs/benchmarks.md measured it "
        "as good as every with a good team and better with a bad annotator in it)",
    )
    annotators_per_set: int = opt(2, "rounds: annotators a shared set goes to", ge=1)
    overlap_share: float = opt(0.25, "rounds: share of the sets that go to annotators_per_set annotators", ge=0, le=1)
    url: str | None = opt(None, "rounds: an annotation app already running (default: the pipeline starts one)")
    token: str | None = opt(None, f"rounds: admin token for url (default: the environment variable {TOKEN_ENV})")
    port: int = opt(0, "rounds: port of the app the pipeline starts (0: any free port)", ge=0, le=65535)
    team: list[dict] = opt(
        factory=lambda: [dict(a) for a in DEFAULT_TEAM],
        help="rounds, simulated: the simulated annotators, each {name, noise, length_bias, seconds_per_ranking}",
    )

    def validate(self) -> None:
        super().validate()
        require(self.source != "file" or bool(self.file), "preferences: source is 'file' but 'file' is not set")
        require(
            self.source != "simulated" or bool(self.prompts),
            "preferences: the simulated annotator needs 'prompts' (a prompt file)",
        )
        require(
            self.source != "annotate" or bool(self.prompts),
            "preferences: source 'annotate' needs 'prompts' (the prompts whose samples people rank)",
        )
        require(
            self.candidates is None or self.candidates >= self.samples_per_prompt,
            f"preferences: candidates ({self.candidates}) must be at least samples_per_prompt "
            f"({self.samples_per_prompt}): the selection keeps samples_per_prompt of them",
        )
        require(
            not (self.source == "simulated" and self.url),
            "preferences: the simulated team ranks in an app the pipeline starts (its users, its tokens); "
            "remove url, or use source: annotate for an app already running",
        )
        names = [a.get("name") for a in self.team if isinstance(a, dict)]
        require(
            len(names) == len(self.team) and all(isinstance(n, str) and n for n in names),
            "preferences: every team member is a mapping with a 'name', e.g. {name: ann-1, noise: 0.5}",
        )
        require(len(set(names)) == len(names), f"preferences: team names must differ, got {names}")


@dataclass(kw_only=True)
class PipelineConfig(Options):
    """Run the whole RLHF pipeline from one YAML file (every section optional)."""

    output: str = opt(help="pipeline folder: one sub-folder per stage, report.html, report.md")
    policy: str = opt("smollm2-135m", "starting policy (and SFT base): alias, folder or hub id")
    title: str = opt("RLHF pipeline", "report title")
    sft: dict = opt(
        factory=dict, help="rlhfkit sft options (policy/output are filled in); skip: true to skip", cli=False
    )
    preferences: PreferencesConfig | None = opt(
        None, "where the preference data comes from (PreferencesConfig)", cli=False
    )
    reward_model: dict = opt(
        factory=dict,
        help="rlhfkit rm train options (train/output filled in); skip: true (only "
        "with algorithm: [dpo]) to train none: evaluation then needs its own 'reward'",
        cli=False,
    )
    algorithm: list[str] = opt(
        factory=lambda: ["ppo"],
        help=f"how the policy is trained: one or several of {', '.join(ALGORITHMS)}, "
        "each from the same starting policy, compared in the report",
    )
    rl: dict = opt(
        factory=dict,
        help="rlhfkit rl options (policy/reward/output/algo filled in); skip: true to skip",
        cli=False,
        was=("ppo",),
    )
    dpo: dict = opt(
        factory=dict, help="rlhfkit dpo options (policy/train/output filled in: the pipeline's preferences)", cli=False
    )
    evaluation: dict = opt(
        factory=dict, help="rlhfkit ppo-eval options (policy/reference/reward filled in); skip: true to skip", cli=False
    )
    rounds: int | None = opt(
        None,
        "InstructGPT's loop: this many rounds of sample -> people rank in the annotation app -> reward model -> "
        "RL from the last round's policy -> evaluation (docs/pipeline.md#rounds); unset: one pass, no app",
        ge=1,
    )
    force: list[str] = opt(factory=list, help=f"stages to re-run even if complete ({', '.join(STAGES)})")
    keep_checkpoints: bool = opt(
        False,
        "keep each finished stage's resumable checkpoint/ (weights and optimizer state: "
        "about 1.6 GB per trained 135M model); its models are kept either way",
    )
    report_to: list[str] = opt(
        factory=lambda: ["tensorboard"],
        help="every training stage's --report-to (tensorboard, wandb, "
        "mlflow, trackio or none) unless its section sets its own",
    )

    def validate(self) -> None:
        super().validate()
        check_output_dir(self.output)
        require(
            self.preferences is not None,
            "pipeline: a 'preferences' section is required: {source: file, file: DATA} "
            "or {source: simulated, prompts: PROMPTS}",
        )
        unknown = [a for a in self.algorithm if a not in ALGORITHMS]
        require(
            bool(self.algorithm) and not unknown,
            f"option 'algorithm': unknown {unknown or 'nothing'}; choose from {', '.join(ALGORITHMS)}",
        )
        unknown = [s for s in self.force if s.rsplit("/", 1)[-1] not in STAGES]
        require(not unknown, f"option --force: unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
        if self.rounds is None:
            require(
                self.preferences.source != "annotate",
                "pipeline preferences: source 'annotate' is the loop with people in it: set rounds: N",
            )
        else:
            online = [a for a in self.algorithm if a in ONLINE]
            require(
                self.preferences.source in ("simulated", "annotate"),
                "pipeline rounds: each round collects rankings of the policy's own samples, so preferences.source "
                "must be 'annotate' (people in the app) or 'simulated' (a simulated team in the app), not 'file'",
            )
            require(
                len(online) == 1 and len(self.algorithm) == 1,
                f"pipeline rounds: algorithm must be one online algorithm ({', '.join(ONLINE)}), the policy that "
                f"continues from round to round; got {self.algorithm}",
            )
            require(
                not self.rl.get("skip") and not self.reward_model.get("skip"),
                "pipeline rounds: every round trains a reward model and continues RL; remove skip from "
                "reward_model and rl",
            )
            n = self.preferences.n_prompts
            require(
                n is None or self.preferences.quota is None or self.preferences.quota <= n,
                f"pipeline preferences: quota ({self.preferences.quota}) is more than a round's sets "
                f"(n_prompts: {n}); every set is ranked by at least one annotator before the quota counts "
                "a second ranking of it only where annotators_per_set allows, so keep quota <= n_prompts",
            )
        check_input_files(self, self.stage_configs())  # every section, built now: errors before the first stage runs

    def stage_configs(self) -> dict[str, Any]:
        """Each stage's command config (``None`` for a skipped stage), with the folders the pipeline fills in."""
        out = Path(self.output)
        sft_opts, ev_opts = dict(self.sft), dict(self.evaluation)
        configs: dict[str, Any] = {"preferences": self.preferences}
        policy = self.policy
        configs["sft"] = (
            None
            if sft_opts.pop("skip", False)
            else _section(
                SFTConfig,
                "sft",
                {"policy": self.policy, "report_to": self.report_to, **sft_opts, "output": str(out / "sft")},
                sft_opts,
            )
        )
        if configs["sft"] is not None:
            policy = str(out / "sft" / EXPORT)
        preferences = str(out / "preferences" / "preferences.jsonl")
        user_rm = dict(self.reward_model)
        warm_start = bool(user_rm.pop("warm_start", False))
        require(
            not warm_start or self.rounds is not None,
            "pipeline reward_model: warm_start continues the last round's reward model; it needs rounds: N",
        )
        rm_opts = {
            "model": policy,
            "eval_fraction": 0.2,
            "allow_ties": True,
            "report_to": self.report_to,
            **user_rm,
            "train": preferences,
            "output": str(out / "reward_model"),
        }
        skip_rm = bool(rm_opts.pop("skip", False))
        online = [a for a in self.algorithm if a in ONLINE]
        require(
            not (skip_rm and online),
            f"pipeline reward_model: skip is only for algorithm: [dpo]; {', '.join(online)} "
            "train against the reward model",
        )
        configs["reward_model"] = None if skip_rm else _section(RMTrainConfig, "reward_model", rm_opts, user_rm)
        reward = None if skip_rm else str(out / "reward_model")
        rl_opts = dict(self.rl)
        skip_rl = rl_opts.pop("skip", False)
        require(
            skip_rl or not online or "prompts" in rl_opts,
            "pipeline rl: option 'prompts' is required (a prompt file for the rollouts)",
        )
        for algo in online:
            configs[algo] = (
                None
                if skip_rl
                else _section(
                    RLConfig,
                    "rl",
                    {
                        "report_to": self.report_to,
                        **rl_opts,
                        "algo": algo,
                        "policy": policy,
                        "reward": reward,
                        "output": str(out / algo),
                    },
                    rl_opts,
                    stage=algo,
                )
            )
        if "dpo" in self.algorithm:
            dpo_opts = {"eval_fraction": 0.2, "allow_ties": True, "report_to": self.report_to, **self.dpo}
            configs["dpo"] = (
                None
                if dpo_opts.pop("skip", False)
                else _section(
                    DPOConfig,
                    "dpo",
                    {**dpo_opts, "policy": policy, "train": preferences, "output": str(out / "dpo")},
                    self.dpo,
                )
            )
        trained = [a for a in self.algorithm if configs[a] is not None]
        policies = [f"{a}={out / a / EXPORT}" for a in trained]
        gold = ev_opts.pop("gold", None)  # a judge the user trusts, e.g. a verifier as module:function
        if gold is None and self.preferences.source == "simulated":  # the labeller's rule: no model ever sees it
            gold = self.preferences.labeller or "rlhfkit.pipeline.simulated:lexicon_reward"
        skip_ev = ev_opts.pop("skip", False) or not trained
        require(
            skip_ev or reward is not None or "reward" in ev_opts,
            "pipeline evaluation: with reward_model skipped, give evaluation a 'reward' to score with (or skip: true)",
        )
        require(
            skip_ev or "prompts" in ev_opts or "prompts" in rl_opts,
            "pipeline evaluation: option 'prompts' is required (held-out prompts to sample from)",
        )
        configs["evaluation"] = (
            None
            if skip_ev
            else _section(
                PPOEvalConfig,
                "evaluation",
                {
                    "prompts": rl_opts.get("prompts"),
                    "reward": reward,
                    **ev_opts,
                    "policy": policies,
                    "reference": policy,
                    "gold": gold,
                    "output": str(out / "evaluation"),
                },
                ev_opts,
            )
        )
        configs["judge"] = {}
        ev = configs["evaluation"]
        if ev is not None and gold and self.rounds is None:  # win rates by a judge that trained nothing
            for algo in trained:
                configs["judge"][algo] = _judge_config(ev, gold, str(out / algo / EXPORT), policy, out / "judge" / algo)
            if reward is not None and ev.bon and max(ev.bon) >= 2:
                n = max(ev.bon)
                configs["judge"][f"best-of-{n}"] = _judge_config(  # n samples per slot: half the slots of a policy
                    ev, gold, policy, policy, out / "judge" / f"best-of-{n}", samples=2, best_of=n, selector=reward
                )
        configs["curves"] = {}
        for algo in online if configs["evaluation"] is not None and gold and self.rounds is None else []:
            rl_cfg = configs[algo]
            if rl_cfg is None or rl_cfg.save_policy_every is None:
                continue
            ev = configs["evaluation"]
            configs["curves"][algo] = EvalConfig(
                checkpoints=rl_cfg.output,
                prompts=ev.prompts,
                n_prompts=ev.n_prompts,
                judge=gold,
                samples_per_prompt=2,
                max_new_tokens=ev.max_new_tokens,
                seed=ev.seed,
                output=str(out / "overoptimisation" / algo),
            )
        if self.rounds is not None:
            configs["rounds"] = [
                _round_configs(r, configs, policy, warm_start, gold, out) for r in range(1, self.rounds + 1)
            ]
        return configs


def _judge_config(
    ev: PPOEvalConfig, gold: str, policy: str, baseline: str, output: Path, samples: int = 4, **best_of: Any
) -> EvalConfig:
    """``rlhfkit eval`` of ``policy`` (or best-of-n of it) against ``baseline`` by ``gold`` on the evaluation's prompts."""
    return EvalConfig(
        policy=policy,
        baseline=baseline,
        prompts=ev.prompts,
        n_prompts=ev.n_prompts,
        judge=gold,
        samples_per_prompt=samples,
        max_new_tokens=ev.max_new_tokens,
        seed=ev.seed,
        output=str(output),
        **best_of,
    )


def _round_configs(r: int, configs: dict, policy: str, warm_start: bool, gold: str | None, out: Path) -> dict:
    """Round ``r``'s stage configs: the one-pass ones with this round's folders and inputs. The reward model
    trains on every list so far (from the starting policy, or the last round's model with warm_start); RL
    continues from the last round's policy, its KL anchored to the starting policy (``reference``)."""
    folder = out / f"round-{r}"
    algo = next(a for a in ONLINE if configs.get(a) is not None)
    previous = out / f"round-{r - 1}"
    rm = configs["reward_model"]
    rm = replace(
        rm,
        train=str(folder / "preferences" / "preferences.jsonl"),
        output=str(folder / "reward_model"),
        **(
            {"init_from": str(previous / "reward_model"), "model": str(previous / "reward_model")}
            if warm_start and r > 1
            else {}
        ),
    )
    rl = configs[algo]
    rl = replace(
        rl,
        policy=str(previous / algo / EXPORT) if r > 1 else rl.policy,
        reference=policy,
        reward=str(folder / "reward_model"),
        output=str(folder / algo),
        seed=rl.seed + r - 1,  # each round its own rollouts
    )
    ev = configs["evaluation"]
    if ev is not None:
        ev = replace(
            ev,
            policy=[f"{algo}={folder / algo / EXPORT}"],
            reference=policy,
            reward=str(folder / "reward_model"),
            gold=gold,
            output=str(folder / "evaluation"),
        )
    return {"reward_model": rm, algo: rl, "evaluation": ev, "algo": algo, "folder": folder}


def check_input_files(cfg: PipelineConfig, configs: dict[str, Any]) -> None:
    """Read every file a section names before the first stage runs, as the stage will read it:
    prompt files (at least one prompt), preference data and SFT data (parsed in full, with the
    section's format options; a parse costs seconds, a late failure the stages before it). An
    error names the YAML key and the file. Files the pipeline writes itself (its preferences,
    under ``output``) are left alone: they do not exist yet. A local ``policy`` folder must be a
    loadable model (:func:`rlhfkit.models.hub.check_model_folder`)."""
    prefs, out = cfg.preferences, Path(cfg.output).absolute()

    def preferences(c: Any) -> Callable[[str], Any]:
        return partial(read_preferences, format=c.format, prompt_column=c.prompt_column, allow_ties=c.allow_ties)

    inputs: list[tuple[str, str | None, Callable[[str], Any]]] = []  # (YAML key, path, reader)
    if configs["sft"] is not None:
        inputs += [("sft.train", configs["sft"].train, read_sft_data), ("sft.eval", configs["sft"].eval, read_sft_data)]
    if prefs.source == "file":
        inputs.append(("preferences.file", prefs.file, preferences(prefs)))
    else:
        inputs.append(("preferences.prompts", prefs.prompts, partial(read_prompts, option="preferences.prompts")))
    if configs["reward_model"] is not None:
        inputs.append(("reward_model.eval", configs["reward_model"].eval, preferences(configs["reward_model"])))
    rl = [configs[a] for a in ONLINE if configs.get(a) is not None]
    inputs += [("rl.prompts", c.prompts, partial(read_prompts, option="rl.prompts")) for c in rl]
    if configs.get("dpo") is not None:
        inputs.append(("dpo.eval", configs["dpo"].eval, preferences(configs["dpo"])))
    if configs["evaluation"] is not None:
        key = "evaluation.prompts" if "prompts" in cfg.evaluation else "rl.prompts"
        inputs.append((key, configs["evaluation"].prompts, partial(read_prompts, option=key)))
    if Path(cfg.policy).expanduser().exists():  # a local folder must be a loadable model (aliases, hub ids load later)
        try:
            resolve_model(cfg.policy, "policy")
        except UserError as e:
            raise UserError(f"pipeline: {e}") from None
    checked = set()
    for key, path, read in inputs:
        if path is None or path in checked or Path(path).absolute().is_relative_to(out):
            continue
        checked.add(path)
        section = key.split(".")[0]
        # Preference data may also be a folder datasets' save_to_disk wrote (annotate export --format hf).
        saved = getattr(read, "func", None) is read_preferences and is_saved_dataset(path)
        if not Path(path).is_file() and not saved:
            what = "is a folder; give a file" if Path(path).is_dir() else "does not exist (or is not a file)"
            raise MissingFileError(f"pipeline {section}: {key} {path} {what}")
        try:
            read(path)
        except (UserError, OSError) as e:
            message = str(e) if key in str(e) else f"{key}: {e}"
            raise UserError(f"pipeline {section}: {message}") from None


def _section(cls: type, section: str, values: dict, written: dict, stage: str | None = None) -> Any:
    """Section ``section`` of the YAML as its command's config: ``values`` are the user's keys
    (``written``) and what the pipeline fills in; an error in one of the user's values names it
    by its key (``evaluation.n_prompts``), the stage too when a section serves several."""
    return from_dict(cls, values, where=f"pipeline {stage or section}", prefix=f"{section}.", written=list(written))


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

    def __init__(self, out: Path, force: list[str], keep_checkpoints: bool = False):
        self.out = out
        self.force = set(force)
        self.keep_checkpoints = keep_checkpoints
        self.results: dict[str, StageResult] = {}

    def stage(self, name: str, config: dict, run: Callable[[Path, bool], dict]) -> StageResult:
        folder = self.out / name
        marker = folder / "stage.json"
        digest = _hash(config)
        if marker.is_file() and name not in self.force:
            done = json.loads(marker.read_text())
            if done.get("hash") == digest:
                logger.warning("stage %s: complete with the same config, reusing %s", name, folder)
                res = StageResult(
                    name, folder, reused=True, seconds=done.get("seconds", 0.0), summary=done.get("summary", {})
                )
                self.results[name] = res
                return res
        resume = False
        if folder.exists():
            started = folder / "stage.started.json"
            same = started.is_file() and json.loads(started.read_text()).get("hash") == digest
            if same and name not in self.force and not marker.is_file() and find_checkpoint(folder) is not None:
                resume = True
                logger.warning("stage %s: resuming an interrupted run from %s", name, find_checkpoint(folder))
            else:  # changed, forced, or stopped before its first checkpoint: start it afresh
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "stage.started.json").write_text(
            json.dumps({"hash": digest, "config": config}, default=str, indent=2)
        )
        print(f"\n=== stage {name} ===", flush=True)
        t0 = time.time()
        summary = run(folder, resume)
        seconds = time.time() - t0
        marker.write_text(json.dumps({"hash": digest, "seconds": seconds, "summary": summary}, default=str, indent=2))
        checkpoint = folder / "checkpoint"
        if not self.keep_checkpoints and checkpoint.is_dir():  # only an interrupted stage resumes from it
            size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
            shutil.rmtree(checkpoint)
            logger.warning(
                "stage %s: complete; removed its resumable checkpoint (%.1f GB; keep_checkpoints: true keeps it)",
                name,
                size / 1e9,
            )
        res = StageResult(name, folder, seconds=seconds, summary=summary)
        self.results[name] = res
        return res

    def hash_of(self, name: str) -> str | None:
        """The completion hash of stage ``name`` (it enters every downstream stage's hash)."""
        marker = self.out / name / "stage.json"
        return json.loads(marker.read_text()).get("hash") if name in self.results and marker.is_file() else None


def _options(cfg: Options) -> dict:
    """A stage config as the plain dict its hash is taken of (the resume flag and the trackers left out:
    changing --report-to neither re-runs a finished stage nor restarts an interrupted one)."""
    return {k: v for k, v in vars(cfg).items() if k not in ("resume", "report_to", "final_checkpoint")}


def _resumed(cfg: Options, resume: bool) -> Any:
    return type(cfg)(**{**vars(cfg), "resume": resume})


def _final_checkpoints(configs: Any, keep: bool) -> None:
    """Every training stage writes its checkpoint after the last step only with ``keep_checkpoints``:
    without it the Runner deletes a finished stage's checkpoint, so writing it (1.6 GB for a 135M
    model) would be pure waste. Left out of the stage hashes, like the trackers."""
    if isinstance(configs, dict):
        configs = list(configs.values())
    for c in configs if isinstance(configs, list) else [configs]:
        if isinstance(c, (dict, list)):
            _final_checkpoints(c, keep)
        elif hasattr(c, "final_checkpoint"):
            c.final_checkpoint = keep


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage that is not complete, then write report.html and report.md."""
    configs = cfg.stage_configs()
    _final_checkpoints(configs, cfg.keep_checkpoints)
    out = Path(cfg.output)
    # one pipeline per folder (a second would start stages afresh under the first); each stage's
    # trainer locks its own folder below this one
    lock = RunLock.take(out)
    runner = Runner(out, cfg.force, cfg.keep_checkpoints)
    t_start = time.time()
    policy = cfg.policy

    if configs["sft"] is not None:
        sft_cfg = configs["sft"]
        runner.stage(
            "sft",
            {"config": _options(sft_cfg)},
            lambda folder, resume: {
                "n_train_examples": len(read_sft_data(sft_cfg.train)),
                **_plain(train_sft(_resumed(sft_cfg, resume))),
            },
        )
        policy = str(Path(sft_cfg.output) / EXPORT)
    upstream = {"policy": policy, "sft": runner.hash_of("sft")}
    if cfg.rounds is not None:
        run_rounds(cfg, configs, runner, policy, upstream)
    else:
        run_one_pass(cfg, configs, runner, policy, upstream)

    seconds = time.time() - t_start
    paths = write_report(cfg, runner.results, out, total_seconds=seconds)
    lock.release()
    return {
        "report_html": str(paths[0]),
        "report_md": str(paths[1]),
        "stages": {k: v.summary for k, v in runner.results.items()},
        "summary": paths[2],
        "seconds": seconds,
    }


def run_one_pass(cfg: PipelineConfig, configs: dict, runner: Runner, policy: str, upstream: dict) -> None:
    """preferences -> reward model -> each algorithm from the same starting policy -> evaluation."""
    prefs = configs["preferences"]
    runner.stage(
        "preferences",
        {"prefs": vars(prefs), **upstream},
        lambda folder, resume: collect_preferences(policy, prefs, folder),
    )
    upstream["preferences"] = runner.hash_of("preferences")

    rm_cfg = configs["reward_model"]
    if rm_cfg is not None:
        runner.stage(
            "reward_model",
            {"config": _options(rm_cfg), **upstream},
            lambda folder, resume: _plain(train_reward_model(_resumed(rm_cfg, resume))),
        )
    trained_on_prefs = dict(upstream)  # DPO's inputs: it never reads the reward model
    upstream["reward_model"] = runner.hash_of("reward_model")

    for algo in cfg.algorithm:  # each from the same starting policy (and reward model)
        stage_cfg = configs[algo]
        if stage_cfg is None:
            continue
        if algo == "dpo":
            runner.stage(algo, {"config": _options(stage_cfg), **trained_on_prefs}, partial(_train_dpo, stage_cfg))
        else:
            runner.stage(algo, {"config": _options(stage_cfg), **upstream}, partial(_train_online, stage_cfg))
        upstream[algo] = runner.hash_of(algo)

    for algo, curve_cfg in configs["curves"].items():  # rl save_policy_every N and a gold judge
        runner.stage(
            f"overoptimisation/{algo}",
            {"config": vars(curve_cfg), **upstream},
            partial(_overoptimisation, curve_cfg, Path(configs[algo].output)),
        )
    if configs["evaluation"] is not None:
        ev_cfg = configs["evaluation"]
        runner.stage(
            "evaluation",
            {"config": vars(ev_cfg), **upstream},
            lambda folder, resume: _plain({k: v for k, v in run_ppo_eval(ev_cfg).items() if k != "plot"}),
        )
    if configs["judge"]:
        judged = {name: vars(c) for name, c in configs["judge"].items()}
        runner.stage("judge", {"config": judged, **upstream}, partial(_judge, configs["judge"]))


def _judge(configs: dict[str, EvalConfig], folder: Path, resume: bool) -> dict:
    """Each trained policy (and best-of-n of the starting policy) against the starting policy by the gold judge:
    win rate with its bootstrap interval, the length-controlled rate, gold scores, KL (``rlhfkit eval``)."""
    rows = []
    for name, cfg in configs.items():
        s = run_eval(cfg)
        keep = ("win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_ci", "score_policy", "score_baseline", "kl")
        rows.append(
            {
                "name": name,
                "judge": cfg.judge,
                "kl_kind": s.get("kl_kind"),
                "pairs": s.get("n_pairs"),
                **{k: s.get(k) for k in keep},
            }
        )
    return _plain({"rows": rows, "n_prompts": s.get("n_prompts")})


def run_rounds(cfg: PipelineConfig, configs: dict, runner: Runner, policy: str, upstream: dict) -> None:
    """InstructGPT's loop (rlhfkit.pipeline.rounds): per round, rankings of the current policy's samples in the
    annotation app -> reward model on every list so far -> RL from the last round's policy -> evaluation."""
    prefs = configs["preferences"]
    prompts, per_round = read_round_prompts(prefs.prompts, prefs.n_prompts, cfg.rounds)
    team_specs = prefs.team if prefs.source == "simulated" else []
    app = open_app(prefs, Path(cfg.output), [a["name"] for a in team_specs])
    try:
        team = None
        if team_specs:
            rule = FunctionSource(prefs.labeller) if prefs.labeller else lexicon_reward
            team = make_team(app, team_specs, rule, prefs.seed)
        current, last_rm = policy, None
        for r, stages in enumerate(configs["rounds"], start=1):
            name = f"round-{r}"
            algo = stages["algo"]
            round_prompts_ = round_prompts(prompts, per_round, r)
            selector_model = last_rm if prefs.selection == "uncertainty" else None
            runner.stage(
                f"{name}/preferences",
                {"prefs": _prefs_hash_view(prefs), "round": r, "policy": current, **upstream},
                partial(_collect_round, app, current, prefs, round_prompts_, r, selector_model, team),
            )
            upstream[f"{name}/preferences"] = runner.hash_of(f"{name}/preferences")
            rm_cfg = stages["reward_model"]
            runner.stage(
                f"{name}/reward_model",
                {"config": _options(rm_cfg), **upstream},
                lambda folder, resume, c=rm_cfg: _plain(train_reward_model(_resumed(c, resume))),
            )
            upstream[f"{name}/reward_model"] = runner.hash_of(f"{name}/reward_model")
            rl_cfg = stages[algo]
            runner.stage(f"{name}/{algo}", {"config": _options(rl_cfg), **upstream}, partial(_train_online, rl_cfg))
            upstream[f"{name}/{algo}"] = runner.hash_of(f"{name}/{algo}")
            ev_cfg = stages["evaluation"]
            if ev_cfg is not None:
                runner.stage(
                    f"{name}/evaluation",
                    {"config": vars(ev_cfg), **upstream},
                    lambda folder, resume, c=ev_cfg: _plain({k: v for k, v in run_ppo_eval(c).items() if k != "plot"}),
                )
            current, last_rm = rl_cfg.output + f"/{EXPORT}", rm_cfg.output
    finally:
        app.close()


def _prefs_hash_view(prefs: PreferencesConfig) -> dict:
    """What a round's preferences depend on: not where the app runs (url, port, token: a moved app holds the
    same rankings), nor the team's pace."""
    view = {k: v for k, v in vars(prefs).items() if k not in ("url", "port", "token")}
    view["team"] = [{k: v for k, v in a.items() if k != "seconds_per_ranking"} for a in prefs.team]
    return view


def _collect_round(app, policy, prefs, prompts, r, selector_model, team, folder: Path, resume: bool) -> dict:
    return collect_round(app, policy, prefs, prompts, r, folder, selector_model=selector_model, team=team)


def _train_online(cfg: RLConfig, folder: Path, resume: bool) -> dict:
    return {"n_prompts": len(read_prompts(cfg.prompts)), **_plain(train_rl(_resumed(cfg, resume)))}


def _overoptimisation(cfg: EvalConfig, run: Path, folder: Path, resume: bool) -> dict:
    """The over-optimisation curve of an RL run (proxy and gold against sqrt(KL)), and its ``best/``: the
    checkpoint with the highest gold score, exported as a whole model beside ``final/``."""
    curve = run_checkpoint_eval(cfg)
    best = curve["best"]
    snapshot = next((s for s in list_snapshots(run) if str(s.path) == str(best.get("path"))), None)
    target = run / "best"
    if snapshot is not None:
        model, tokenizer = load_snapshot(snapshot, device=torch.device("cpu"), dtype=torch.float32)
        files = {
            POLICY_INFO: json.dumps(snapshot.info, indent=2, default=str),  # its run's record: reference etc.
            "best.json": json.dumps({"chosen_by": cfg.judge, **best}, indent=2, default=str),
        }
        export_pretrained(model, tokenizer, target, files=files)
    elif target.exists():
        shutil.rmtree(target)
    return _plain(
        {
            "best": best.get("name"),
            "best_update": best.get("update"),
            "best_gold": best.get("gold"),
            "best_exported": str(target) if snapshot is not None else None,
            "proxy_rose_after_gold_fell": curve["proxy_rose_after_gold_fell"],
            "message": curve["message"],
            "judge": cfg.judge,
            "points": len(curve["rows"]),
        }
    )


def _train_dpo(cfg: DPOConfig, folder: Path, resume: bool) -> dict:
    return _plain(train_dpo(_resumed(cfg, resume)))


def collect_preferences(policy: str, prefs: PreferencesConfig, folder: Path) -> dict:
    """The preference stage: copy a file into ``ranked`` JSONL, or simulate an annotator."""
    if prefs.source == "file":
        examples = read_preferences(
            prefs.file, format=prefs.format, prompt_column=prefs.prompt_column, allow_ties=prefs.allow_ties
        )
        write_preferences(folder / "preferences.jsonl", examples, "ranked")
        return {"source": f"file {prefs.file}", **_plain(describe(examples))}
    return simulate_preferences(policy, prefs, folder)


def simulate_preferences(policy: str, prefs: PreferencesConfig, folder: Path) -> dict:
    """Sample K answers per prompt from the policy and let the scripted labeller rank them."""
    prompts = read_prompts(prefs.prompts)[: prefs.n_prompts]
    k = prefs.samples_per_prompt
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_policy(policy, device=device, dtype=inference_dtype(None, device))
    apply_cpu_matmul("auto", device, model)
    settings = SamplingSettings(max_new_tokens=prefs.max_new_tokens, temperature=prefs.temperature, top_p=prefs.top_p)
    chat = use_chat_template(tokenizer, prefs.chat_template, policy)
    samples = sample_texts(
        model, tokenizer, prompts, k, settings, chat=chat, batch_size=prefs.batch_size, seed=prefs.seed
    )
    rule, name = None, NAME
    if prefs.labeller:  # any rule f(prompts, responses) -> scores, as 'module:function'
        rule, name = FunctionSource(prefs.labeller), f"simulated annotator (rule {prefs.labeller})"
    texts = [p.text for p in prompts]
    examples, stats = rank_samples(texts, samples, rule)
    if not examples:
        raise ConfigError(
            "the simulated annotator found no preference in any list; sample more prompts or longer answers"
        )
    write_preferences(folder / "preferences.jsonl", examples, "ranked")
    (folder / "samples.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "responses": s}, ensure_ascii=False) + "\n" for p, s in zip(texts, samples)),
        encoding="utf-8",
    )
    return {"source": name, "samples_per_prompt": k, **vars(stats), **_plain(describe(examples))}


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
