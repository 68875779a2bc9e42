"""The ``rlhfkit`` command: parse, call the library, exit code. Nothing else lives here.

Every entry point, including ``accelerate launch -m rlhfkit.cli ...`` in each process,
goes through :func:`run_command`, the one error path: a :class:`~rlhfkit.errors.UserError`
(a bad option, file or line) prints one paragraph and exits with 2, a
:class:`~rlhfkit.errors.RunStopped` (the run stopped itself) exits with 1, never a
traceback for either; a SIGTERM or SIGINT during training ends it after the current step,
with a checkpoint, and exits with 143 or 130 (:mod:`rlhfkit.training.signals`). Each command imports its library module when it runs (the only
imports inside functions here), so ``rlhfkit --help`` answers without loading torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial

from rlhfkit.config import parse_args
from rlhfkit.errors import RunStopped, UserError
from rlhfkit.training.lock import release_all as release_locks
from rlhfkit.training.signals import Interrupted
from rlhfkit.training.signals import restore_all as restore_signal_handlers

USAGE = """usage: rlhfkit COMMAND [options]   (rlhfkit COMMAND --help for each)

reward models
  rm train      train a reward model on rank lists, pairs, choices or scores
  rm eval       held-out accuracy, list-exact accuracy, Kendall tau, diagnostics
  score         score texts with a reward model (or a DPO run's implicit reward)

supervised fine-tuning and online RL
  sft           supervised fine-tuning on instruction data (loss on response tokens only)
  rl            online RL against a reward source with a KL leash: --algo ppo|rloo|grpo|reinforce++
  ppo           the same as rl --algo ppo (a critic, GAE)
  bon           best-of-n sampling (also writes rejection-sampling data)
  generate      plain sampling
  ppo-eval      score and KL of policy, reference and best-of-n on held-out prompts
  eval          win rate of a policy against a baseline by a judge, with intervals, length-controlled

preference optimisation without a reward model
  dpo           DPO, IPO or listwise DPO straight from rank lists, pairs or choices

the whole pipeline
  pipeline      SFT -> preferences -> reward model -> PPO -> evaluation -> report.html

annotation
  annotate      web app where annotators rank K generations; add-user, export

models
  models        list the embedded default models; 'models prepare [NAME...]' converts them now
  plan          memory per device of a training run (weights, optimizer, activations, KV cache), and which config fits
"""


def _main_process() -> bool:
    """Under ``accelerate launch`` only one process prints the summary."""
    return os.environ.get("RANK", "0") == "0"


def _resume_step(cfg) -> int | None:
    """The step of the checkpoint a ``--resume`` starts from (None: not resuming, or no readable
    checkpoint, which the trainer reports)."""
    if not cfg.resume:
        return None
    checkpoint = importlib.import_module("rlhfkit.checkpoint")
    found = checkpoint.find_checkpoint(cfg.output)
    try:
        return checkpoint.read_state(found)["step"] if found is not None else None
    except UserError:
        return None


def _said_nothing_to_do(cfg, start: int | None, finished: bool) -> bool:
    """A ``--resume`` of a run that was already finished trains nothing and has no metrics to
    print: say so (instead of 'score nan') and return True."""
    if start is None or not finished or _resume_step(cfg) != start:
        return False
    print(
        f"{cfg.output} is already finished at step {start} of {start}; nothing to do (the model is in {cfg.output}/final)"
    )
    return True


# ------------------------------------------------------------------------ commands
def _rm(argv: Sequence[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rlhfkit rm {train,eval} [options]   (rlhfkit rm train --help, rlhfkit rm eval --help)")
        if not argv:
            raise UserError("rlhfkit rm needs a subcommand: train or eval")
        return
    sub, rest = argv[0], argv[1:]
    if sub == "train":
        train = importlib.import_module("rlhfkit.rm.train")
        train.train_reward_model(parse_args(train.RMTrainConfig, rest, prog="rlhfkit rm train"))
    elif sub == "eval":
        commands = importlib.import_module("rlhfkit.rm.commands")
        cfg = parse_args(commands.RMEvalConfig, rest, prog="rlhfkit rm eval")
        commands.print_eval(commands.run_eval(cfg), cfg.json)
    else:
        raise UserError(f"rlhfkit rm: unknown subcommand {sub!r}; use 'train' or 'eval'")


def _score(argv: Sequence[str]) -> None:
    commands = importlib.import_module("rlhfkit.rm.commands")
    cfg = parse_args(commands.ScoreConfig, argv, prog="rlhfkit score", positional="texts")
    texts, scores = commands.run_score(cfg)
    commands.print_scores(texts, scores, cfg.json)


def _sft(argv: Sequence[str]) -> None:
    sft = importlib.import_module("rlhfkit.sft.train")
    cfg = parse_args(sft.SFTConfig, argv, prog="rlhfkit sft")
    start = _resume_step(cfg)
    result = sft.train_sft(cfg)
    if not _main_process() or _said_nothing_to_do(cfg, start, result.get("finished", False)):
        return
    if result.get("finished"):
        line = f"model saved to {result['final']} after {result['step']} steps; train loss {result.get('train/loss', float('nan')):.4f}"
        if "eval/loss" in result:
            line += f", eval loss {result['eval/loss']:.4f} (perplexity {result['eval/perplexity']:.2f}); best/ from step {result['best_step']}"
        print(line)
    else:
        print(f"stopped at step {result['step']} with a checkpoint in {cfg.output}/checkpoint; continue with --resume")


def _rl(argv: Sequence[str], ppo_only: bool = False) -> None:
    trainer = importlib.import_module("rlhfkit.rl.trainer")
    cls, prog = (trainer.PPOConfig, "rlhfkit ppo") if ppo_only else (trainer.RLConfig, "rlhfkit rl")
    cfg = parse_args(cls, argv, prog=prog)
    start = _resume_step(cfg)
    result = trainer.train_rl(cfg)
    if not _main_process() or _said_nothing_to_do(cfg, start, "final" in result):
        return
    if "final" in result:
        kl = f"KL {result['rl/kl']:.4f}" if "rl/kl" in result else "no KL (no reference policy)"
        print(
            f"policy saved to {result['final']}; score {result.get('rl/score_mean', float('nan')):.4f}, "
            f"{kl} at the last update"
        )


def _dpo(argv: Sequence[str]) -> None:
    dpo = importlib.import_module("rlhfkit.dpo.train")
    cfg = parse_args(dpo.DPOConfig, argv, prog="rlhfkit dpo")
    start = _resume_step(cfg)
    result = dpo.train_dpo(cfg)
    if not _main_process() or _said_nothing_to_do(cfg, start, result.get("finished", False)):
        return
    if not result.get("finished"):
        print(f"stopped at step {result['step']} with a checkpoint in {cfg.output}/checkpoint; continue with --resume")
        return
    line = f"policy saved to {result['final']} after {result['step']} steps; train loss {result.get('train/loss', float('nan')):.4f}"
    if "eval/pairwise_accuracy" in result:
        line += (
            f", held-out implicit-reward accuracy {result['eval/pairwise_accuracy']:.4f} (list-exact "
            f"{result['eval/list_exact_accuracy']:.4f}); best/ from step {result['best_step']}"
        )
    if "eval/kl" in result:
        line += f"; KL to the reference {result['eval/kl']:.3f} nats per response"
    print(line)


def _generate(argv: Sequence[str]) -> None:
    commands = importlib.import_module("rlhfkit.rl.commands")
    commands.run_generate(parse_args(commands.GenerateConfig, argv, prog="rlhfkit generate"))


def _bon(argv: Sequence[str]) -> None:
    commands = importlib.import_module("rlhfkit.rl.commands")
    commands.run_bon(parse_args(commands.BonConfig, argv, prog="rlhfkit bon"))


def _ppo_eval(argv: Sequence[str]) -> None:
    commands = importlib.import_module("rlhfkit.rl.commands")
    cfg = parse_args(commands.PPOEvalConfig, argv, prog="rlhfkit ppo-eval")
    commands.print_eval_table(commands.run_ppo_eval(cfg), cfg.json)


def _eval(argv: Sequence[str]) -> None:
    commands = importlib.import_module("rlhfkit.judge.commands")
    cfg = parse_args(commands.EvalConfig, argv, prog="rlhfkit eval")
    commands.print_summary(commands.run_eval(cfg), cfg.json)


def _pipeline(argv: Sequence[str]) -> None:
    run = importlib.import_module("rlhfkit.pipeline.run")
    argv = list(argv)
    if argv and not argv[0].startswith("-"):  # the old positional form: rlhfkit pipeline CONFIG.yaml
        argv = ["--config", argv[0], *argv[1:]]
    cfg = parse_args(run.PipelineConfig, argv, prog="rlhfkit pipeline")
    result = run.run_pipeline(cfg)
    print(f"\nPipeline finished in {result['seconds']:.0f} s.")
    print(f"Report: {result['report_html']}  (Markdown: {result['report_md']})")
    print(f"\n{result['summary']}")


def _annotate(argv: Sequence[str]) -> None:
    importlib.import_module("rlhfkit.annotate.cli").run(argv)


def _models(argv: Sequence[str]) -> None:
    hub = importlib.import_module("rlhfkit.models.hub")
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: rlhfkit models [prepare [NAME ...]]\n\n"
            "  rlhfkit models                 list the embedded default models\n"
            "  rlhfkit models prepare [NAME]  convert them into the model cache now (default: all)"
        )
        return
    if argv and argv[0] == "prepare":
        for name in argv[1:] or list(hub.ALIASES):
            print(f"{name}: {hub.resolve_model(name)}")
        return
    if argv:
        raise UserError(
            f"rlhfkit models: unknown argument {argv[0]!r}; use 'rlhfkit models' or 'rlhfkit models prepare [NAME]'"
        )
    for name, what in hub.ALIASES.items():
        print(f"{name:14s} {what}")


def _plan(argv: Sequence[str]) -> None:
    commands = importlib.import_module("rlhfkit.plan.commands")
    argv = list(argv)
    for i, arg in enumerate(argv[:-1]):  # --config is a YAML file of options here too; the sharding is --sharding
        if arg == "--config" and argv[i + 1] in commands.SHARDINGS and not os.path.isfile(argv[i + 1]):
            raise UserError(
                f"--config {argv[i + 1]}: --config is a YAML file of options in every command; for the "
                f"sharding use --sharding {argv[i + 1]}"
            )
    cfg = parse_args(commands.PlanConfig, argv, prog="rlhfkit plan")
    commands.print_plan(commands.run_plan(cfg), cfg.json)


# commands that run models on the CPU
THREADED = ("score", "bon", "generate", "ppo-eval", "eval", "annotate", "pipeline", "rm")
COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "rm": _rm,
    "score": _score,
    "sft": _sft,
    "ppo": partial(_rl, ppo_only=True),
    "rl": _rl,
    "dpo": _dpo,
    "bon": _bon,
    "generate": _generate,
    "ppo-eval": _ppo_eval,
    "eval": _eval,
    "pipeline": _pipeline,
    "annotate": _annotate,
    "models": _models,
    "plan": _plan,
}


# ---------------------------------------------------------------------- error path
def run_command(prog: str, body: Callable[[], object]) -> int:
    """Run ``body`` and turn what it raises into an exit code (module docstring)."""
    try:
        code = body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # argparse's --help (0); our own exits
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except Interrupted as e:  # SIGTERM or SIGINT, handled by the training core (a checkpoint, unless a second one)
        hint = "run the same command again to continue" if prog == "rlhfkit pipeline" else "continue with --resume"
        print(f"{prog}: {e.what}; {hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; continue a training run with --resume", file=sys.stderr)
        return 130
    finally:  # a run that raised never reached Run.close: give back its folder's lock and the signal handlers
        release_locks()
        restore_signal_handlers()
    return code if isinstance(code, int) else 0


def _quiet_transformers() -> None:
    """Keep transformers' per-file progress bars and load reports off the user's screen."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from rlhfkit import __version__

        print(f"rlhfkit {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"rlhfkit: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prog = f"rlhfkit {argv[0]}"

    def body() -> None:
        if not any(a in ("-h", "--help") for a in argv[1:]):
            _quiet_transformers()
            if argv[0] in THREADED:  # the trainers choose their threads in start_run (--threads)
                importlib.import_module("rlhfkit.cpu").configure_threads(None)
        command(argv[1:])

    return run_command(prog, body)


def console() -> None:
    """The ``rlhfkit`` command (and ``python -m rlhfkit.cli``): :func:`main`, then a quick exit.

    Tearing down the interpreter after torch and transformers are loaded takes about 0.9 s (1.8 s
    after a SmolLM2 run; docs/benchmarks.md, "Start-up and shut-down of a short run"), spent
    freeing thousands of module objects nobody reads again. Once every file is closed (a run
    closes its own), the exit hooks have run (trackers finish, locks are released) and the
    buffers are flushed, ``os._exit`` ends the process without that. With another (non-daemon)
    thread still running, Python's ordinary exit waits for it as before. :func:`main` itself never
    exits, so tests and the Python API keep their process."""
    import atexit
    import threading

    code = main()
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)  # Python's exit joins these; daemon threads (tqdm's monitor) it abandons either way
    atexit._run_exitfuncs()  # what the interpreter would run at exit: trackers, logging, locks
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head) or stream: nothing more can be written
            pass
    os._exit(code)


if __name__ == "__main__":
    console()
