"""`make demo-rm`: train a reward model on the embedded MiniLM backbone from the example rank
lists, evaluate it on held-out lists, and score two texts. A few minutes on a 2-core CPU.

Every step is the same `rlhfkit` command a user would type; they are printed as they run.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from rlhfkit.cli import main as rlhfkit

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "outputs" / "demo-rm"


def run(*argv: str) -> None:
    print(f"\n$ rlhfkit {' '.join(argv)}", flush=True)
    rc = rlhfkit(list(argv))
    if rc != 0:
        sys.exit(rc)


def main() -> None:
    t0 = time.time()
    data = HERE / "reviews_ranklists.tsv"
    if OUT.exists():
        shutil.rmtree(OUT)  # the demo's own folder: start fresh each time
    run(
        "rm",
        "train",
        "--model",
        "minilm-l6",
        "--train",
        str(data),
        "--prompt-column",
        "--n-train",
        "500",
        "--output",
        str(OUT),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "1e-4",
        "--max-length",
        "96",
        "--eval-every",
        "25",
    )
    run("rm", "eval", "--model", str(OUT), "--eval", str(data), "--prompt-column", "--n-skip", "500")
    prompt = "Write a short review of the kettle."
    run(
        "score",
        "--model",
        str(OUT),
        "--prompt",
        prompt,
        "I love this kettle. The design is superb. Highly recommended!",
        "This kettle is terrible. The lid broke in a week. Do not buy.",
    )
    report = json.loads((OUT / "eval_report.json").read_text())
    print(
        f"\nDemo finished in {time.time() - t0:.0f} s. Held-out pairwise accuracy {report['pairwise_accuracy']:.3f}, "
        f"list-exact accuracy {report['list_exact_accuracy']:.3f} over {report['n_lists']} lists.\n"
        f"Model: {OUT}/best  Curves: {OUT}/curves.png  Score histogram: {OUT}/eval_scores.png"
    )


if __name__ == "__main__":
    main()
