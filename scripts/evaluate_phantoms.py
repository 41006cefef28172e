"""The README's explanation-evaluation table: every method measured on held-out phantom slices.

    .venv/bin/python scripts/evaluate_phantoms.py [--work runs/evaluation] [--method M ...] [--max-slices N]

Held-out data: the sample model's test phantoms (configs/sample_model.yaml ``test_groups`` at
``test_seed``; never seen in training or model selection) plus as many again drawn with ``test_seed + 500``
on the same grids, so that at least 200 nodule slices are explained. The evaluation is
``medvit_explain.workflows.evaluate.evaluate_explanations`` with the sample model on CPU (the same as
``medvit-explain evaluate runs/evaluation/phantoms --target malignancy --target spiculation``); it writes
``metrics.json`` and ``evaluation.html`` to ``--work`` and prints the Markdown table for the README.

Targets: malignancy (binary, localization and its ABPC) and spiculation (regression; second target for
class sensitivity). More targets multiply the cost of the pixel methods (ig, smoothgrad) and of ABPC.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from medvit_explain.model import load_model
from medvit_explain.phantom import make_phantom_groups
from medvit_explain.registry import method_names
from medvit_explain.report.evaluation import markdown_table, write_evaluation
from medvit_explain.workflows.evaluate import evaluate_explanations

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "sample_model.yaml"))
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped sample model)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "evaluation"))
    parser.add_argument("--data", default=None, help="held-out phantom folder (default: WORK/phantoms)")
    parser.add_argument("--method", action="append", default=None, help="method (repeat); default: all")
    parser.add_argument(
        "--target", action="append", default=None, help="target (repeat); default: malignancy and spiculation"
    )
    parser.add_argument("--max-slices", type=int, default=None)
    parser.add_argument("--randomize-blocks", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", choices=["default", "agcam"], default="default")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = yaml.safe_load(Path(args.config).read_text())["training"]["phantoms"]
    work = Path(args.work)
    data = Path(args.data) if args.data else work / "phantoms"
    t0 = time.perf_counter()
    if not data.exists():
        make_phantom_groups(data, recipe["test_groups"], recipe["test_seed"], "test", workers=args.threads)
        make_phantom_groups(data, recipe["test_groups"], recipe["test_seed"] + 500, "extra", workers=args.threads)
    model = load_model(args.model, device="cpu")
    methods = args.method or method_names()
    result = evaluate_explanations(
        model,
        data,
        methods,
        args.target or ["malignancy", "spiculation"],
        batch_size=args.batch_size,
        seed=args.seed,
        max_slices=args.max_slices,
        randomize_blocks=args.randomize_blocks,
        protocol=args.protocol,
    )
    written = write_evaluation(result, work)
    m = result.metrics
    print(
        f"{m['n_slices']} held-out nodule slices ({m['n_nodules']} nodules, {m['n_studies']} phantoms); "
        f"model: malignancy AUC {m['model']['malignancy_auc']:.3f} on {m['n_model_slices']} slices; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print(markdown_table(m))
    print(json.dumps({"flagged by the randomisation check": m["randomization_flagged"]}))
    print(f"wrote {written['metrics']} and {written['report']}")


if __name__ == "__main__":
    main()
