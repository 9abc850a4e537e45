"""The streamed engine: lazy readers, merge planning, per-tensor merging, atomic sharded writes."""

from dare_lab.engine.merge import NonFiniteError, as_dtype, merge_models, merge_state_dicts, model_card
from dare_lab.engine.plan import PoolMismatchError, TensorPlan, plan_merge
from dare_lab.engine.scope import DEFAULT_EXCLUDE, Scope
from dare_lab.engine.sources import CheckpointReader, StateDictSource, resolve_model_dir
from dare_lab.engine.writer import AtomicDir, ShardedSafetensorsWriter

__all__ = [
    "merge_models", "merge_state_dicts", "model_card", "as_dtype", "NonFiniteError",
    "PoolMismatchError", "TensorPlan", "plan_merge", "Scope", "DEFAULT_EXCLUDE",
    "CheckpointReader", "StateDictSource", "resolve_model_dir", "AtomicDir", "ShardedSafetensorsWriter",
]
