"""lm-eval taskpool: a local YAML task, offline, on an in-memory tiny Llama and from disk."""

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'dare_lab[lmeval]')")

from dare_lab.taskpool.lm_eval_pool import PRESETS, LMEvalTaskPool, expand_tasks, flatten_results, merge_results  # noqa: E402
from dare_lab.pools.tiny import make_tiny_pool  # noqa: E402

ROWS = [{"question": f"what is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "label": (a + b) % 3}
        for a in range(4) for b in range(3)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    # the same rows asked another way, to run a second shot group
    (tasks / "tiny_sum_q.yaml").write_text((tasks / "tiny_sum.yaml").read_text().replace("task: tiny_sum", "task: tiny_sum_q")
                                           .replace("{{question}} answer:", "Q: {{question}}\\nA:"))
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
    # lm-eval's own files: results.json + results.md; no samples unless log_samples
    assert sorted(p.name for p in (tmp_path / "lm_eval").iterdir()) == ["results.json", "results.md"]
    assert json.loads((tmp_path / "lm_eval" / "results.json").read_text())["results"]["tiny_sum"]["acc,none"] == metrics["tiny_sum/acc"]
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


def test_results_json_table_and_samples_in_lm_eval_layout(setup, tmp_path, capsys):
    """Two shot groups, log_samples: one results.json in lm-eval's layout, its make_table text, per-task samples."""
    from lm_eval.utils import make_table
    from transformers import AutoModelForCausalLM

    pool, tasks = setup
    model = AutoModelForCausalLM.from_pretrained(pool.models["ft0"]).eval()
    tp = LMEvalTaskPool([{"task": "tiny_sum", "num_fewshot": 0}, {"task": "tiny_sum_q", "num_fewshot": 1}],
                        include_path=str(tasks), include_defaults=False, backend={"name": "hf", "batch_size": 4},
                        output_dir=str(tmp_path), log_samples=True)
    metrics = tp.evaluate(model, pool)
    out = tmp_path / "lm_eval"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "samples_tiny_sum.jsonl",
                                                   "samples_tiny_sum_q.jsonl"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # lm-eval's timestamped temp dir is gone

    res = json.loads((out / "results.json").read_text())
    # what `lm_eval --output_path` writes: simple_evaluate's dict + the tracker's entries, no samples
    assert {"results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config",
            "git_hash", "date", "lm_eval_version", "transformers_version", "task_hashes", "model_source", "model_name",
            "model_name_sanitized", "total_evaluation_time_seconds"} <= set(res)
    assert "samples" not in res
    assert res["n-shot"] == {"tiny_sum": 0, "tiny_sum_q": 1}  # both shot groups in one file
    assert set(res["results"]) == set(res["configs"]) == set(res["versions"]) == set(res["task_hashes"]) == {"tiny_sum",
                                                                                                          "tiny_sum_q"}
    assert res["n-samples"]["tiny_sum"] == {"original": len(ROWS), "effective": len(ROWS)}
    assert res["higher_is_better"]["tiny_sum"] == {"acc": True}
    assert res["configs"]["tiny_sum_q"]["num_fewshot"] == 1 and res["configs"]["tiny_sum"]["task"] == "tiny_sum"
    assert res["config"]["model_args"] == {"pretrained": "in_memory", "backend": "hf"} and res["model_name"] == "in_memory"
    assert res["config"]["limit"] is None and res["config"]["bootstrap_iters"] == 0 and res["model_source"] == "CUSTOM"
    assert {f"{t}/{k}" for t in res["results"] for k in ("acc", "n")} == set(metrics)
    assert all(res["results"][t]["acc,none"] == metrics[f"{t}/acc"] for t in res["results"])

    # make_table text: saved, printed, and what lm-eval's make_table gives for the saved JSON
    table = (out / "results.md").read_text()
    assert table.strip() == make_table(res).strip()
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in table.splitlines()[2:] if r.strip()}
    assert rows["tiny_sum"][3] == "0" and rows["tiny_sum_q"][3] == "1" and rows["tiny_sum"][4] == "acc"
    assert float(rows["tiny_sum_q"][6]) == pytest.approx(metrics["tiny_sum_q/acc"], abs=5e-5)
    printed = capsys.readouterr().out
    assert table.strip() in printed and str(out) in printed

    # per-sample records, sanitized as lm-eval writes them
    for task, prompt in (("tiny_sum", "{q} answer:"), ("tiny_sum_q", "Q: {q}\nA:")):
        recs = [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]
        assert sorted(r["doc_id"] for r in recs) == list(range(len(ROWS)))
        assert {"doc", "target", "arguments", "resps", "filtered_resps", "acc", "doc_hash", "prompt_hash",
                "target_hash"} <= set(recs[0])
        by_id = {r["doc_id"]: r for r in recs}
        for i, row in enumerate(ROWS):
            r = by_id[i]
            assert r["doc"] == row and r["target"] == str(row["label"])
            assert sorted(r["arguments"]) == ["gen_args_0", "gen_args_1", "gen_args_2"]  # one per choice
            ctx = r["arguments"]["gen_args_0"]["arg_0"]
            assert ctx.endswith(prompt.format(q=row["question"]))
            assert ctx.count("A:" if task == "tiny_sum_q" else "answer:") == (2 if task == "tiny_sum_q" else 1)
            assert [r["arguments"][f"gen_args_{j}"]["arg_1"] for j in range(3)] == [" " + c for c in row["choices"]]
        assert sum(r["acc"] for r in recs) / len(recs) == pytest.approx(metrics[f"{task}/acc"])
        assert res["n-samples"][task]["effective"] == len(recs)


def test_log_samples_setting_and_output_dir(tmp_path):
    with pytest.raises(ValueError, match=r"taskpool.log_samples='yes': expected true or false"):
        LMEvalTaskPool(["x"], log_samples="yes")
    assert LMEvalTaskPool(["x"]).opts["log_samples"] is False
    assert LMEvalTaskPool(["x"]).resolved_output_dir() is None  # outside Hydra, no output_dir: nothing is written
    assert LMEvalTaskPool(["x"], output_dir=str(tmp_path)).resolved_output_dir() == tmp_path


def test_output_dir_defaults_to_the_hydra_run_dir(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    run = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(tmp_path)))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: run))
    assert LMEvalTaskPool(["x"]).resolved_output_dir() == tmp_path
    assert LMEvalTaskPool(["x"], output_dir=str(tmp_path / "o")).resolved_output_dir() == tmp_path / "o"


def test_a_file_lm_eval_could_not_write_is_an_error(tmp_path):
    """lm-eval's tracker only logs a warning when it cannot save: dare_lab raises, naming the place."""
    from dare_lab.taskpool.lm_eval_pool import write_lm_eval_files

    class Silent:  # a tracker whose save failed (lm-eval caught the exception and logged it)
        date_id = "2026"

        def save_results_aggregated(self, results, samples=None):
            pass

    res = {"results": {"t": {"acc,none": 0.5}}, "versions": {"t": 0}, "n-shot": {"t": 0}, "higher_is_better": {}}
    with pytest.raises(OSError, match="lm-eval could not write its results JSON into .*lm_eval"):
        write_lm_eval_files(res, Silent(), tmp_path / "lm_eval")
    assert [p.name for p in tmp_path.iterdir()] == ["lm_eval"] and not list((tmp_path / "lm_eval").iterdir())


def test_merge_results_unites_shot_groups():
    a = {"results": {"t1": {"acc,none": 0.5}}, "configs": {"t1": {}}, "n-shot": {"t1": 0}, "config": {"batch_sizes": [4]},
         "date": 1.0, "samples": {"t1": [1]}}
    b = {"results": {"t2": {"acc,none": 0.25}}, "configs": {"t2": {}}, "n-shot": {"t2": 5}, "config": {"batch_sizes": [2]},
         "date": 2.0, "samples": {"t2": [2]}, "groups": {"g": {}}}
    m = merge_results([a, b])
    assert m["results"] == {"t1": {"acc,none": 0.5}, "t2": {"acc,none": 0.25}} and m["n-shot"] == {"t1": 0, "t2": 5}
    assert m["samples"] == {"t1": [1], "t2": [2]} and m["groups"] == {"g": {}}
    assert m["date"] == 1.0 and m["config"] == {"batch_sizes": [4, 2]} and a["config"] == {"batch_sizes": [4]}
