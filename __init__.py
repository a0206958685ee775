"""autopar: an auto-parallelism planner for PyTorch.

Data flows one way: model -> graph capture (``autopar.profiles``) -> costs
(``autopar.cost_models``) -> search (``autopar.planner``) -> ``Plan`` -> program and
launch scripts (``autopar.codegen``). ``autopar.cli`` is a thin command line on top.
"""

__version__ = "0.1.0"

import time as _time

# When this process first imported autopar: a source file modified later may have been imported in either version
# (``planner.search_cache`` then stores no answer).
IMPORTED_S = _time.time()
