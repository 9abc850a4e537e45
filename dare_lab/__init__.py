"""dare_lab: DARE delta sparsification and model merging (arXiv 2311.03099).

Three rings: ``dare_lab.ops`` (pure tensor math), ``dare_lab.engine`` (streams checkpoints
one tensor at a time through the ops) and the Hydra shell (``dare_lab.shell.cli``, ``configs/``).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: ``import dare_lab`` stays cheap; ``dare_lab.merge`` pulls in torch on first use.
    if name == "merge":
        from dare_lab.shell.api import merge

        return merge
    raise AttributeError(f"module 'dare_lab' has no attribute {name!r}")
