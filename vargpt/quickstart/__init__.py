"""The embedded default: ``python -m vargpt.quickstart`` trains every stage of a small VARGPT on the shapes world
and reports what it learned (``configs/quickstart/pipeline.yaml``; see the README)."""

from vargpt.quickstart.config import QuickstartConfig, load_quickstart_config
from vargpt.quickstart.pipeline import QuickstartError, run_pipeline

__all__ = ["QuickstartConfig", "QuickstartError", "load_quickstart_config", "run_pipeline"]
