"""Every decoder taskpool/modelpool config composes and instantiates (no evaluation)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TASKPOOLS = ["gsm8k", "gsm_symbolic", "math", "humaneval", "mbpp", "alpacaeval", "decoder", "decoder_tiny", "lm_eval",
             "lm_eval_open_llm_leaderboard"]


@pytest.mark.parametrize("name", TASKPOOLS)
def test_taskpool_config_instantiates(name):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="config", overrides=[f"taskpool={name}"])
    tp = instantiate(cfg.taskpool, _convert_="all")
    assert callable(getattr(tp, "evaluate", None))


def test_wizard_pool_config_matches_the_paper():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="config", overrides=["modelpool=wizard_llama2_13b", "taskpool=decoder"])
    pool = instantiate(cfg.modelpool, _convert_="all")
    assert pool.base == "meta-llama/Llama-2-13b-hf" and set(pool.models) == {"wizardlm", "wizardmath", "code_alpaca"}
    assert pool.prompts == {"wizardlm": "vicuna", "wizardmath": "alpaca_cot", "code_alpaca": "alpaca"}
    from dare_lab.taskpool.generation.prompts import resolve_template

    tp = instantiate(cfg.taskpool, _convert_="all")
    chosen = {t["name"]: resolve_template(pool, None, t.get("prompt_model"), "raw") for t in tp.tasks}
    assert chosen == {"alpacaeval": "vicuna", "gsm8k": "alpaca_cot", "math": "alpaca_cot", "humaneval": "alpaca", "mbpp": "alpaca"}
    assert tp.backend["name"] == "vllm"
