"""Decoder track: generation backends (HF, vLLM), prompts, scorers and the generation taskpool."""

from dare_lab.taskpool.generation.backends import HFBackend, VLLMBackend, make_backend, vllm_available
from dare_lab.taskpool.generation.prompts import TEMPLATES, render, resolve_template
from dare_lab.taskpool.generation.taskpool import GenerationTaskPool

__all__ = ["GenerationTaskPool", "HFBackend", "VLLMBackend", "make_backend", "vllm_available", "TEMPLATES", "render",
           "resolve_template"]
