"""GSM8K / MATH answer extraction and the pass@k estimator on realistic outputs."""

import math

import pytest

from dare_lab.taskpool.generation.code.scoring import extract_code, pass_at_k
from dare_lab.taskpool.generation.math_scoring import (
    extract_gsm8k_answer,
    extract_math_answer,
    gsm8k_correct,
    gsm8k_reference,
    last_boxed,
    math_correct,
    math_equiv,
    math_reference,
)

GSM8K_OUTPUTS = [
    # (model output, expected extracted value)
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72", 72),
    ("Let's think step by step. Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10.\n"
     "The answer is: 10", 10),
    ("He pays 3 * $1,200 = $3,600 in total. The answer is $3,600.", 3600),
    ("The total distance is 1,234.5 km, so the answer is 1,234.5 km.", 1234.5),
    ("First 5 apples, then 7 more, then she eats 2. So she has 10 apples left.", 10),
    ("So the discount is 25%. The answer is 25%.", 25),
    ("The temperature dropped to -4 degrees. The answer is -4.", -4),
    ("Each box holds 12 eggs and there are 3 boxes, so 36 eggs. Final: \\boxed{36}", 36),
    ("She has 3 cats, 2 dogs. The answer is 5 pets (3 cats and 2 dogs).", 5),
    ("There are 60 minutes in an hour, so 2 hours is 120 minutes.\n\nThe answer is: 120.", 120),
    ("The answer is 0.75", 0.75),
    ("The answer is 3/4 of the pie.", 0.75),
    ("I am not sure.", None),
]


@pytest.mark.parametrize("text,expected", GSM8K_OUTPUTS)
def test_gsm8k_extraction(text, expected):
    got = extract_gsm8k_answer(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_gsm8k_reference_and_correct():
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072"
    assert gsm8k_reference(gold) == 1072
    assert gsm8k_correct("so the answer is 1072.", gold)
    assert gsm8k_correct("#### 1,072", gold)
    assert not gsm8k_correct("The answer is 1071.", gold)
    assert not gsm8k_correct("no idea", gold)
    assert gsm8k_reference(288) == 288.0
    with pytest.raises(ValueError, match="no number"):
        gsm8k_reference("#### none")


MATH_OUTPUTS = [
    # (output, gold, correct?)
    ("So the slope is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),
    ("Thus $x = \\boxed{\\dfrac{1}{2}}$", "\\frac12", True),
    ("We get $\\boxed{0.5}$", "\\frac{1}{2}", True),
    ("First \\boxed{3}, but correcting: \\boxed{4}", "4", True),
    ("First \\boxed{3}, but correcting: \\boxed{4}", "3", False),
    ("The area is $\\boxed{12\\text{ square units}}$.", "12", True),
    ("The angle is \\boxed{90^\\circ}.", "90", True),
    ("The answer is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("The final answer is $\\boxed{x = 5}$.", "5", True),
    ("Hence $\\boxed{\\sqrt2}$", "\\sqrt{2}", True),
    ("He pays \\boxed{\\$18.90}", "18.90", True),
    ("So $\\boxed{10\\%}$ of them.", "10", True),
    ("So it is $\\boxed{1,000}$.", "1000", True),
    ("The answer is $3/4$.", "\\frac{3}{4}", True),
    ("Therefore the sum is \\boxed{\\frac{a+b}{2}}", "\\frac{a+b}{2}", True),
    ("Therefore \\boxed{\\frac{a+b}{3}}", "\\frac{a+b}{2}", False),
    ("I could not solve it.", "7", False),
]


@pytest.mark.parametrize("text,gold,ok", MATH_OUTPUTS)
def test_math_correct(text, gold, ok):
    assert math_correct(text, gold) is ok


def test_last_boxed_nested_and_reference():
    assert last_boxed("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed 5 apples") == "5"
    assert last_boxed("\\boxed{unbalanced") is None
    assert last_boxed("nothing") is None
    assert extract_math_answer("The answer is $\\pi$.") == "\\pi"
    assert math_reference({"solution": "so $\\boxed{42}$"}) == "42"
    assert math_reference({"answer": "7", "solution": "\\boxed{8}"}) == "7"
    with pytest.raises(ValueError, match="neither"):
        math_reference({"solution": "no box"})
    assert not math_equiv(None, "1")


def test_pass_at_k_matches_definition():
    # unbiased estimator 1 - C(n-c, k) / C(n, k)
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 5, 2), (7, 2, 7)]:
        expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    with pytest.raises(ValueError, match="k=3"):
        pass_at_k(2, 1, 3)


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"
