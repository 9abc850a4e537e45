"""Prompt templates the paper's source models expect, selectable per model.

* ``alpaca``: the Alpaca instruction template (WizardLM, WizardMath, llama-2-13b-code-alpaca
  as evaluated by the paper's code base);
* ``alpaca_cot``: WizardMath's variant ending in "Let's think step by step." (GSM8K, MATH);
* ``alpaca_code``: the code prompt of the paper's code base (two blank lines after the first
  sentence, "Create a Python script for this problem:" before the instruction);
* ``vicuna``: the USER/ASSISTANT format of WizardLM-13B-V1.2;
* ``chat``: the tokenizer's own chat template (error when it has none);
* ``raw``: the instruction as is (base models, HumanEval body completion).

A model pool selects one per model with ``prompts: {model_name: template}``; a generation
taskpool uses its ``prompt`` option, else the template of its ``prompt_model``, else the one
template all pool models share, else the task's default. That choice applies under the
``lenient`` protocol only: under ``paper`` (the default) every task uses the prompt the paper's
code gives it whatever the model (see ``tasks.py`` and docs/decoder.md).
"""

from __future__ import annotations

from dare_lab.engine.pool import ModelPool

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
TEMPLATES: dict[str, str | None] = {
    "alpaca": ALPACA,
    "alpaca_cot": ALPACA + " Let's think step by step.",
    "alpaca_code": ("Below is an instruction that describes a task. Write a response that appropriately completes "
                    "the request.\n\n\n### Instruction:\nCreate a Python script for this problem:\n{instruction}\n\n"
                    "### Response:"),
    "vicuna": ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the user's questions. USER: {instruction} ASSISTANT:"),
    "raw": "{instruction}",
    "chat": None,  # the tokenizer's chat template
}


def check_template(name: str) -> str:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose one of {sorted(TEMPLATES)}")
    return name


def render(template: str, instruction: str, tokenizer=None) -> str:
    """Fill ``template`` with ``instruction``; ``chat`` uses ``tokenizer.apply_chat_template``."""
    check_template(template)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt template 'chat' needs a tokenizer with a chat_template; "
                             "pick alpaca, alpaca_cot, vicuna or raw instead")
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return TEMPLATES[template].format(instruction=instruction)


def resolve_template(pool: ModelPool | None, explicit: str | None, prompt_model: str | None, default: str) -> str:
    """Pick the template for a task (see the module docstring for the order)."""
    if explicit:
        return check_template(explicit)
    prompts = dict(getattr(pool, "prompts", {}) or {})
    for name in prompts.values():
        check_template(name)
    if prompt_model:
        if prompt_model not in prompts:
            known = sorted(prompts) or "none"
            raise ValueError(f"prompt_model {prompt_model!r} has no template in the model pool's prompts (pool lists: {known})")
        return prompts[prompt_model]
    distinct = set(prompts.values())
    if len(distinct) == 1:
        return distinct.pop()
    return check_template(default)
