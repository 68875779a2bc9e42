"""``rlhfkit pipeline CONFIG.yaml [--output DIR] [--force STAGE ...]``."""

from __future__ import annotations

import argparse
import time
from typing import Sequence


def main(argv: Sequence[str]) -> int:
    from rlhfkit.config import from_dict, load_yaml
    from rlhfkit.pipeline.run import STAGES, PipelineConfig, run_pipeline

    parser = argparse.ArgumentParser(prog="rlhfkit pipeline", description="SFT -> preferences -> reward model -> PPO -> evaluation -> report")
    parser.add_argument("config", help="pipeline YAML file (see examples/pipeline_demo.yaml)")
    parser.add_argument("--output", help="override the YAML's output folder")
    parser.add_argument("--force", nargs="*", default=None, choices=STAGES, help="re-run these stages even if complete")
    args = parser.parse_args(list(argv))
    values = load_yaml(args.config)
    if args.output:
        values["output"] = args.output
    if args.force is not None:
        values["force"] = args.force
    t0 = time.time()
    result = run_pipeline(from_dict(PipelineConfig, values, where=args.config))
    print(f"\nPipeline finished in {time.time() - t0:.0f} s.")
    print(f"Report: {result['report_html']}  (Markdown: {result['report_md']})")
    print(f"\n{result['summary']}")
    return 0
