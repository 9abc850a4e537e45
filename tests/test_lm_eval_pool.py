"""lm-eval taskpool: a local YAML task, offline, on an in-memory tiny Llama and from disk."""

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'dare_lab[lmeval]')")

from dare_lab.taskpool.lm_eval_pool import PRESETS, LMEvalTaskPool, expand_tasks, flatten_results  # noqa: E402
from dare_lab.pools.tiny import make_tiny_pool  # noqa: E402

ROWS = [{"question": f"what is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": (a + b) % 3}
        for a in range(4) for b in range(3)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a busy 2-core box torch's default threads are ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    pool = make_tiny_pool(root / "pool", arch="llama", n_models=1, seed=1)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (tasks / "tiny_sum.yaml").write_text(
        "task: tiny_sum\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}} answer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return pool, tasks


def _hand_accuracy(model, tok):
    """acc by hand: argmax over choices of log P(" " + choice | context), lm-eval's encoding."""
    correct = 0
    for r in ROWS:
        ctx = f"{r['question']} answer:"
        lls = []
        for choice in r["choices"]:
            whole = tok(ctx + " " + choice, add_special_tokens=False)["input_ids"]
            n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
        correct += int(max(range(len(lls)), key=lls.__getitem__) == r["label"])
    return correct / len(ROWS)


def test_local_yaml_task_on_in_memory_model_offline(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pool, tasks = setup
    model = AutoModelForCausalLM.from_pretrained(pool.models["ft0"]).eval()
    tp = LMEvalTaskPool(["tiny_sum"], include_path=str(tasks), include_defaults=False, backend={"name": "hf", "batch_size": 4},
                        output_dir=str(tmp_path))
    metrics = tp.evaluate(model, pool)
    assert metrics["tiny_sum/n"] == len(ROWS)
    expected = _hand_accuracy(model, AutoTokenizer.from_pretrained(pool.base))
    assert metrics["tiny_sum/acc"] == pytest.approx(expected)
    assert json.loads((tmp_path / "lm_eval_metrics.json").read_text()) == metrics
    # the same model from its directory gives the same numbers
    assert LMEvalTaskPool(["tiny_sum"], include_path=str(tasks), include_defaults=False,
                          backend={"name": "hf", "batch_size": 4, "device": "cpu"}).evaluate(pool.models["ft0"]) == metrics


def test_unknown_task_is_named(setup):
    pool, tasks = setup
    tp = LMEvalTaskPool(["tiny_sum", "tiny_product"], include_path=str(tasks), include_defaults=False)
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['tiny_product'\]"):
        tp.evaluate(pool.base)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        LMEvalTaskPool(["x"], include_path="/no_such_dir")
    with pytest.raises(ValueError, match="unknown lm-eval backend 'tgi'"):
        LMEvalTaskPool(["x"], backend="tgi")


def test_presets_and_flattening():
    six = expand_tasks("open_llm_leaderboard", None)
    assert [(t["task"], t["num_fewshot"]) for t in six] == [
        ("arc_challenge", 25), ("hellaswag", 10), ("mmlu", 5), ("truthfulqa_mc2", 0), ("winogrande", 5), ("gsm8k", 5)]
    assert all(t["num_fewshot"] == 0 for t in expand_tasks(["open_llm_leaderboard"], 0))
    assert expand_tasks([{"task": "piqa", "num_fewshot": 3}, "arc_easy"], None) == [
        {"task": "piqa", "num_fewshot": 3}, {"task": "arc_easy", "num_fewshot": None}]
    assert len(PRESETS["open_llm_leaderboard"]) == 6
    flat = flatten_results({"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match,none": 0.5,
                                      "acc_stderr,none": "N/A", "sample_len": 8}})
    assert flat == {"gsm8k/exact_match_strict-match": 0.25, "gsm8k/exact_match": 0.5, "gsm8k/n": 8.0}
    with pytest.raises(ValueError, match="unknown key"):
        expand_tasks([{"task": "piqa", "shots": 3}], None)
    with pytest.raises(ValueError, match="no tasks"):
        expand_tasks([], None)
