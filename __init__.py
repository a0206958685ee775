"""autopar: an auto-parallelism planner for PyTorch.

Data flows one way: model -> graph capture (``autopar.profiles``) -> costs
(``autopar.cost_models``) -> search (``autopar.planner``) -> ``Plan`` -> program and
launch scripts (``autopar.codegen``). ``autopar.cli`` is a thin command line on top.
"""

__version__ = "0.1.0"
