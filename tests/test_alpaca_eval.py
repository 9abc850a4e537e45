"""AlpacaEval through alpaca_eval itself (mocked: a fake module in sys.modules records the call; no network)."""

import json
import sys
import types

import pytest

from dare_lab.taskpool.generation import GenerationTaskPool
from dare_lab.taskpool.generation.alpaca_eval import AlpacaEvalJudge, build_judge

pd = pytest.importorskip("pandas")

ROWS = [
    {"instruction": "Name a primary colour.", "output": "Red.", "generator": "text_davinci_003", "dataset": "helpful_base"},
    {"instruction": "Say hello in French.", "output": "Bonjour !", "generator": "text_davinci_003", "dataset": "koala"},
    {"instruction": "What is 2 + 2?", "output": "4", "generator": "text_davinci_003", "dataset": "vicuna"},
]


class Echo:
    name = "echo"

    def generate(self, prompts, max_new_tokens, stop=()):
        return [f"My answer {i}." for i, _ in enumerate(prompts)]


@pytest.fixture()
def fake_alpaca_eval(monkeypatch):
    """alpaca_eval.evaluate as alpaca_eval 0.6.6 returns it with is_return_instead_of_print=True."""
    calls = []

    def evaluate(**kw):
        calls.append(kw)
        name = kw["name"]
        prefs = [2.0, 1.0, 1.5][: len(kw["model_outputs"])]
        annotations = pd.DataFrame([{"instruction": o["instruction"], "output_1": r["output"], "output_2": o["output"],
                                     "generator_1": r["generator"], "generator_2": o["generator"], "preference": p}
                                    for o, r, p in zip(kw["model_outputs"], kw["reference_outputs"], prefs)])
        win = 100.0 * sum(p - 1 for p in prefs) / len(prefs)
        board = pd.DataFrame.from_dict({name: {"win_rate": win, "standard_error": 12.5, "mode": "community",
                                               "avg_length": 11, "n_wins": 1, "n_draws": 1, "n_total": len(prefs),
                                               "discrete_win_rate": win}}, orient="index")
        return board, annotations

    module = types.ModuleType("alpaca_eval")
    module.evaluate = evaluate
    monkeypatch.setitem(sys.modules, "alpaca_eval", module)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used")
    return calls


@pytest.fixture()
def alpaca_src(tmp_path):
    src = tmp_path / "alpaca_eval.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in ROWS))
    return str(src)


def test_alpaca_eval_judge_calls_alpaca_eval_with_the_papers_annotator(fake_alpaca_eval, alpaca_src, tmp_path):
    out = tmp_path / "out"
    tp = GenerationTaskPool([{"name": "alpacaeval", "source": alpaca_src}], backend=Echo(), output_dir=str(out),
                            judge={"kind": "alpaca_eval", "annotators_config": "chatgpt_fn"})
    m = tp.evaluate("/runs/dare_merged")
    assert len(fake_alpaca_eval) == 1
    kw = fake_alpaca_eval[0]
    export = json.loads((out / "alpacaeval" / "model_outputs.json").read_text())
    assert kw["model_outputs"] == export == [
        {"instruction": r["instruction"], "output": f"My answer {i}.", "generator": "dare_merged", "dataset": r["dataset"]}
        for i, r in enumerate(ROWS)]
    assert kw["reference_outputs"] == ROWS  # the dataset's own text-davinci-003 references (AlpacaEval 1)
    assert kw["annotators_config"] == "chatgpt_fn" and kw["fn_metric"] == "get_winrate" and kw["sort_by"] == "win_rate"
    assert kw["name"] == "dare_merged" and kw["output_path"] == str(out / "alpacaeval")
    assert kw["is_return_instead_of_print"] is True and kw["precomputed_leaderboard"] is None
    assert kw["is_cache_leaderboard"] is False and kw["max_instances"] is None
    assert m["alpacaeval/win_rate"] == pytest.approx(50.0) and m["alpacaeval/standard_error"] == 12.5
    assert m["alpacaeval/judged"] == 1.0 and m["alpacaeval/paper_metric"] == 1.0 and m["alpacaeval/n_total"] == 3.0
    assert [r["preference"] for r in tp.last_outputs["alpacaeval"]] == [2.0, 1.0, 1.5]
    saved = json.loads((out / "alpacaeval" / "judgements.json").read_text())
    assert saved["win_rate"] == pytest.approx(50.0) and "chatgpt_fn" in saved["judge"]


def test_other_alpaca_eval_settings_are_not_called_the_papers(fake_alpaca_eval, alpaca_src, tmp_path):
    judge = {"kind": "alpaca_eval", "annotators_config": "weighted_alpaca_eval_gpt4_turbo",
             "fn_metric": "get_length_controlled_winrate", "max_instances": 2, "evaluate_kwargs": {"seed": 1}}
    m = GenerationTaskPool([{"name": "alpacaeval", "source": alpaca_src}], backend=Echo(), output_dir=str(tmp_path),
                           judge=judge).evaluate("/m")
    kw = fake_alpaca_eval[0]
    assert kw["sort_by"] == "length_controlled_winrate" and kw["max_instances"] == 2 and kw["seed"] == 1
    assert m["alpacaeval/paper_metric"] == 0.0


def test_alpaca_eval_judge_falls_back_to_export_only_saying_why(alpaca_src, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "alpaca_eval", None)  # import alpaca_eval -> ImportError
    judge, note = build_judge({"kind": "alpaca_eval", "annotators_config": "chatgpt_fn"})
    assert judge is None and "pip install 'dare_lab[alpacaeval]'" in note
    m = GenerationTaskPool([{"name": "alpacaeval", "source": alpaca_src}], backend=Echo(), output_dir=str(tmp_path),
                           judge={"kind": "alpaca_eval"}).evaluate("/m")
    assert m == {"alpacaeval/exported": 3.0, "alpacaeval/judged": 0.0, "alpacaeval/n": 3.0}
    out = capsys.readouterr().out
    assert "ONLY OUTPUTS WERE EXPORTED" in out and "alpaca_eval cannot be imported" in out
    monkeypatch.setitem(sys.modules, "alpaca_eval", types.ModuleType("alpaca_eval"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    judge, note = build_judge({"kind": "alpaca_eval"})
    assert judge is None and note == "alpaca_eval judge configured but $OPENAI_API_KEY is not set"
    judge, _ = build_judge({"kind": "alpaca_eval", "api_key_env": None})  # e.g. a local vLLM annotator
    assert isinstance(judge, AlpacaEvalJudge) and judge.annotators_config == "chatgpt_fn"


def test_home_made_judges_are_marked_not_the_papers(alpaca_src, tmp_path, caplog):
    m = GenerationTaskPool([{"name": "alpacaeval", "source": alpaca_src}], backend=Echo(), output_dir=str(tmp_path),
                           judge=lambda instruction, reference, output: 1.0).evaluate("/m")
    assert m["alpacaeval/win_rate"] == 100.0 and m["alpacaeval/paper_metric"] == 0.0
    assert "NOT the paper's metric" in caplog.text
    with pytest.raises(ValueError, match="choose alpaca_eval"):
        build_judge({"kind": "gpt4"})


def test_alpacaeval_config_defaults_to_export_only():
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    configs = Path(__file__).resolve().parent.parent / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(config_name="config", overrides=["taskpool=alpacaeval"])
        assert cfg.taskpool.judge is None
        cfg = compose(config_name="config", overrides=[
            "taskpool=alpacaeval", "taskpool.judge={kind: alpaca_eval, annotators_config: chatgpt_fn}"])
        assert dict(cfg.taskpool.judge) == {"kind": "alpaca_eval", "annotators_config": "chatgpt_fn"}


def test_the_call_matches_the_installed_alpaca_eval_signature():
    import inspect

    real = pytest.importorskip("alpaca_eval", reason="alpaca_eval not installed (pip install 'dare_lab[alpacaeval]')")
    params = inspect.signature(real.evaluate).parameters
    for name in ("model_outputs", "reference_outputs", "annotators_config", "name", "output_path", "precomputed_leaderboard",
                 "is_cache_leaderboard", "is_return_instead_of_print", "fn_metric", "sort_by", "max_instances"):
        assert name in params, name
