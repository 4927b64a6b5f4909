"""``python -m vargpt.quickstart [PIPELINE_YAML] [key=value ...] [--fresh]``: the whole embedded default.

Writes the shapes-world shards, trains the image tokenizer, builds the text tokenizer, runs alignment ->
understanding SFT -> generation SFT (with its resolution switch) -> DPO -> editing SFT through ``train.py``, evaluates,
and writes ``<root>/report/`` (default ``runs/quickstart/report/``). Rerunning continues after the last finished step;
``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from vargpt.config import ConfigError
from vargpt.quickstart.config import DEFAULT_PIPELINE, load_quickstart_config
from vargpt.quickstart.pipeline import REPORT_DIR, QuickstartError, run_pipeline


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vargpt.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", nargs="?", type=Path, default=DEFAULT_PIPELINE,
                        help=f"pipeline YAML (default {DEFAULT_PIPELINE})")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. root=runs/mine evaluation.per_task=50")
    parser.add_argument("--fresh", action="store_true", help="delete <root> first and redo every step")
    arguments = parser.parse_args(argv)
    if arguments.pipeline is not None and "=" in str(arguments.pipeline):
        arguments.overrides.insert(0, str(arguments.pipeline))
        arguments.pipeline = DEFAULT_PIPELINE
    logging.basicConfig(level=logging.INFO, format="[quickstart] %(message)s")
    try:
        config = load_quickstart_config(arguments.pipeline, arguments.overrides)
        metrics = run_pipeline(config, fresh=arguments.fresh)
    except (ConfigError, QuickstartError, FileNotFoundError) as error:
        print(f"quickstart: {error}", file=sys.stderr)
        return 2
    report = Path(config.root) / REPORT_DIR
    print(json.dumps({name: check for name, check in metrics["targets"].items()}, indent=2))
    print(f"report: {report / 'README.md'} (metrics: {report / 'metrics.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
