"""``matformer reproduce``: the paper's claims (arXiv 2310.07707) measured with one command.

- :mod:`.plan` -- what is trained (recipes, baselines, the equal-tokens control), the matching
  rule, and the paper's numbers the report puts beside ours;
- :mod:`.stages` -- training and every measurement, each a resumable stage; :mod:`.run` runs
  them in order;
- :mod:`.report` -- ``results.json``, ``report.md`` and the plots;
- :mod:`.sizes` -- what each granularity of one checkpoint costs and gives (``matformer sizes``).
"""

from .plan import RECIPES, ReproConfig, quick_config
from .run import reproduce

__all__ = ["RECIPES", "ReproConfig", "quick_config", "reproduce"]
