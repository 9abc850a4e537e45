"""Backends: per-backend options, workers that fail loudly, left truncation.

vLLM cannot be installed here, so a fake ``vllm`` package (``LLM`` / ``SamplingParams`` that
record their arguments to a JSON-lines file) is written to a temporary directory on
``sys.path``; the spawned worker imports it exactly as it would import the real one, so the
recorded kwargs are the kwargs the real ``LLM(...)`` would get.
"""

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dare_lab.pools.tiny import make_tiny_pool
from dare_lab.taskpool.generation import backends
from dare_lab.taskpool.generation.backends import (HFBackend, VLLMBackend, Worker, WorkerError, _truncate_left,
                                                   make_backend, route_backend_spec)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

FAKE_VLLM = textwrap.dedent('''
    """A stand-in for vllm: records what it is given; FAKE_VLLM_MODE makes it misbehave."""
    import json, os, signal, time

    def _log(event, **kw):
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
            f.write(json.dumps({"event": event, **kw}) + "\\n")

    def _misbehave(stage):
        mode = os.environ.get("FAKE_VLLM_MODE", "")
        if mode == stage + ":exit":
            os._exit(7)
        if mode == stage + ":segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if mode == stage + ":hang":
            time.sleep(3600)
        if mode == stage + ":raise":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\\n(second line of the message)")

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class _O:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, model, **kw):
            _log("init", model=model, kwargs=kw)
            _misbehave("init")
            self.model = model

        def get_tokenizer(self):
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(self.model)

        def generate(self, prompts, params):
            _log("generate", prompts=prompts, params=params.kw)
            _misbehave("generate")
            return [_O(outputs=[_O(text="The answer is: 42")]) for _ in prompts]
''')

FAKE_WORKERS = textwrap.dedent('''
    """Worker targets: worker(conn, *args) as Worker starts them."""
    import os, time

    def answers(conn, value):
        conn.send(("ok", value))

    def exits(conn, code):
        os._exit(code)

    def hangs(conn, seconds):
        time.sleep(seconds)

    def raises(conn, message):
        raise ValueError(message)

    def lm_eval_exits(conn, model_dir, vllm_args, groups, opts):
        os._exit(9)

    def lm_eval_hangs(conn, model_dir, vllm_args, groups, opts):
        time.sleep(3600)

    def lm_eval_reports(conn, model_dir, vllm_args, groups, opts):
        conn.send(("error", "ValueError: no GPU memory left"))

    def lm_eval_ok(conn, model_dir, vllm_args, groups, opts):
        conn.send(("ok", {"arc_easy/acc": 0.5, "args": 0.0 if vllm_args.get("dtype") != "auto" else 1.0}))
''')


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("fakes")
    (root / "vllm").mkdir()
    (root / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (root / "dare_lab_fake_workers.py").write_text(FAKE_WORKERS)
    return root


@pytest.fixture()
def fake_vllm(fakes, tmp_path, monkeypatch):
    """The fake vllm importable here and in spawned workers; returns a reader of its log."""
    monkeypatch.syspath_prepend(str(fakes))
    log = tmp_path / "vllm_calls.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.delenv("FAKE_VLLM_MODE", raising=False)
    monkeypatch.setattr(backends, "vllm_available", lambda: (True, "ok"))  # no GPU here
    sys.modules.pop("vllm", None)
    yield lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    sys.modules.pop("vllm", None)
    sys.modules.pop("dare_lab_fake_workers", None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_pool(tmp_path_factory.mktemp("tiny_llama_backends"), arch="llama", n_models=1, seed=0)


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return instantiate(cfg.taskpool, _convert_="all")


# --- 1. backend-specific keys live with the backend -------------------------------------------------

SINGLE_TASK = ["gsm8k", "gsm_symbolic", "math", "humaneval", "mbpp", "alpacaeval", "decoder", "decoder_tiny"]


@pytest.mark.parametrize("name", SINGLE_TASK)
def test_every_generation_config_routes_to_both_backends(name):
    tp = _compose(f"taskpool={name}")
    hf_name, hf = route_backend_spec(tp.backend | {"name": "hf"})
    vl_name, vl = route_backend_spec(tp.backend | {"name": "vllm"})
    assert (hf_name, vl_name) == ("hf", "vllm")
    assert "batch_size" in hf and "tensor_parallel_size" not in hf
    assert vl["dtype"] == "auto" and not set(vl) & backends.EXCLUSIVE_OPTIONS["hf"]  # the paper: vLLM dtype auto
    backends._check_options(HFBackend, hf, "hf", skip=2)


def test_gsm8k_config_under_vllm_gives_llm_only_vllm_kwargs(fake_vllm, tiny, tmp_path):
    """`dare-lab modelpool=tiny_llama taskpool=gsm8k taskpool.backend.name=vllm`, evaluation included."""
    src = tmp_path / "gsm8k.jsonl"
    src.write_text("\n".join(json.dumps({"question": f"What is {a} + 40?", "answer": f"... #### {a + 40}"}) for a in (2, 3)))
    tp = _compose("modelpool=tiny_llama", "taskpool=gsm8k", "taskpool.backend.name=vllm")
    tp.tasks[0]["source"] = str(src)
    metrics = tp.evaluate(tiny.base)
    assert metrics["gsm8k/n"] == 2.0 and metrics["gsm8k/accuracy"] == 0.5  # "The answer is: 42" is right once
    calls = fake_vllm()
    init = [c for c in calls if c["event"] == "init"]
    assert init == [{"event": "init", "model": str(tiny.base),
                     "kwargs": {"tensor_parallel_size": 1, "dtype": "auto", "gpu_memory_utilization": 0.9, "seed": 0}}]
    gen = [c for c in calls if c["event"] == "generate"]
    assert len(gen) == 1 and gen[0]["params"]["temperature"] == 0.0 and gen[0]["params"]["max_tokens"] == 1024
    assert len(gen[0]["prompts"]) == 2 and all("What is" in p for p in gen[0]["prompts"])
    # the same config under HF builds an HF backend with the HF block
    hf = make_backend(_compose("taskpool=gsm8k").backend, tiny.base)
    assert isinstance(hf, HFBackend) and hf.batch_size == 8


def test_a_key_the_backend_does_not_take_is_one_clear_line():
    with pytest.raises(ValueError, match=r"^generation backend 'vllm' does not take 'batch_size' \(an option of backend 'hf'\)"):
        route_backend_spec({"name": "vllm", "batch_size": 8})
    with pytest.raises(ValueError, match=r"generation backend 'hf' does not take 'tensor_parallel_size'"):
        route_backend_spec({"name": "hf", "hf": {"tensor_parallel_size": 2}})
    with pytest.raises(ValueError, match=r"^generation backend 'vllm' does not take 'num_threads'"):
        make_backend({"name": "vllm", "vllm": {"num_threads": 1}}, "/some/dir")
    with pytest.raises(ValueError, match=r"^backend 'vllm' does not take \['batch_size'\] \(options of backend 'hf'\)"):
        VLLMBackend("/some/dir", batch_size=8)
    with pytest.raises(ValueError, match=r"generation backend 'hf' does not take \['flash'\]; its options are"):
        make_backend({"name": "hf", "hf": {"flash": True}}, "/some/dir")
    with pytest.raises(ValueError, match="unknown generation backend 'tgi'"):
        route_backend_spec({"name": "tgi"})
    # flat keys of the chosen backend still work; the other backend's block is ignored; None = unset
    assert route_backend_spec({"name": "hf", "batch_size": 2, "max_input_tokens": None, "vllm": {"dtype": "auto"}}) == (
        "hf", {"batch_size": 2})
    assert route_backend_spec({"name": "vllm", "dtype": "half", "vllm": {"dtype": "auto", "seed": 1}}) == (
        "vllm", {"dtype": "half", "seed": 1})
    with pytest.raises(ValueError, match=r"^generation backend 'vllm' does not take 'batch_size'"):
        make_backend(_compose("taskpool=gsm8k", "taskpool.backend.name=vllm", "+taskpool.backend.batch_size=4").backend, "/x")


# --- 2. workers that fail loudly ----------------------------------------------------------------------

def _gen(be):
    t0 = time.monotonic()
    try:
        be.generate(["Say hi."], 8)
    finally:
        be.close()
        assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("mode, message", [
    ("generate:exit", r"^vLLM worker for \S+ exited with code 7 while generating 1 completions \(max_new_tokens 8\), without answering$"),
    ("generate:segv", r"^vLLM worker for \S+ killed by SIGSEGV while generating 1 completions"),
    ("init:exit", r"^vLLM worker for \S+ exited with code 7 while loading the model, without answering$"),
])
def test_vllm_worker_that_dies_is_one_line_error(fake_vllm, monkeypatch, mode, message):
    monkeypatch.setenv("FAKE_VLLM_MODE", mode)
    with pytest.raises(WorkerError, match=message) as e:
        _gen(VLLMBackend("/models/merged", poll_s=0.2))
    assert "\n" not in str(e.value)


def test_vllm_worker_that_hangs_is_killed_after_its_timeout(fake_vllm, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "generate:hang")
    be = VLLMBackend("/models/merged", request_timeout_s=3, poll_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"^vLLM worker for /models/merged gave no answer within 3s while generating "
                                          r"1 completions \(max_new_tokens 8\); killed it"):
        be.generate(["Say hi."], 8)
    assert time.monotonic() - t0 < 30
    assert be._proc is None  # forgotten; a close() afterwards is a no-op
    be.close()


def test_vllm_worker_that_raises_reports_the_first_line(fake_vllm, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_MODE", "generate:raise")
    with pytest.raises(WorkerError, match=r"^vLLM generation failed for /models/merged: RuntimeError: CUDA out of memory\. "
                                          r"Tried to allocate 2\.00 GiB \(…\)$"):
        _gen(VLLMBackend("/models/merged", poll_s=0.2))
    monkeypatch.setenv("FAKE_VLLM_MODE", "init:raise")
    with pytest.raises(WorkerError, match=r"^vLLM could not load /models/merged: RuntimeError: CUDA out of memory"):
        _gen(VLLMBackend("/models/merged", poll_s=0.2))


def test_vllm_worker_killed_between_requests(fake_vllm):
    be = VLLMBackend("/models/merged", poll_s=0.2)
    try:
        assert be.generate(["a", "b"], 4) == ["The answer is: 42"] * 2
        os.kill(be._proc.pid, signal.SIGKILL)
        be._proc.join(10)
        with pytest.raises(WorkerError, match=r"^vLLM worker for /models/merged killed by SIGKILL while generating 1"):
            be.generate(["c"], 4)
    finally:
        be.close()


def test_worker_errors_print_as_one_line_in_the_cli():
    from dare_lab.shell.cli import USER_ERRORS

    assert issubclass(WorkerError, USER_ERRORS) and issubclass(backends.BackendUnavailable, USER_ERRORS)
    assert issubclass(WorkerError, RuntimeError) and issubclass(backends.BackendUnavailable, RuntimeError)


def test_worker_helper_with_plain_targets(fakes, monkeypatch):
    monkeypatch.syspath_prepend(str(fakes))
    import dare_lab_fake_workers as fw

    w = Worker(fw.answers, (41,), "test worker", poll_s=0.1)
    assert w.wait("answering", 30) == ("ok", 41)
    w.close(msg=None)
    for target, args, timeout, message in [
        (fw.exits, (3,), 30, r"^test worker exited with code 3 while working, without answering$"),
        (fw.raises, ("boom",), 30, r"^test worker exited with code 1 while working, without answering$"),
        (fw.hangs, (3600,), 2, r"^test worker gave no answer within 2s while working; killed it"),
    ]:
        w = Worker(target, args, "test worker", poll_s=0.1)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=message):
            w.wait("working", timeout)
        assert time.monotonic() - t0 < 30 and not w.proc.is_alive()
        w.close(msg=None)


def _lm_eval_pool(fakes, monkeypatch, target, **vllm):
    from dare_lab.taskpool import lm_eval_pool

    monkeypatch.syspath_prepend(str(fakes))
    monkeypatch.setattr(lm_eval_pool, "vllm_available", lambda: (True, "ok"))
    import dare_lab_fake_workers as fw

    tp = lm_eval_pool.LMEvalTaskPool(["arc_easy", {"task": "piqa", "num_fewshot": 3}],
                                     backend={"name": "vllm", "hf": {"batch_size": 8}, "vllm": {"poll_s": 0.2, **vllm}})
    tp.worker_target = getattr(fw, target)
    return tp


def test_lm_eval_vllm_worker_fails_loudly(fakes, monkeypatch):
    tp = _lm_eval_pool(fakes, monkeypatch, "lm_eval_exits")
    with pytest.raises(WorkerError, match=r"^lm-eval vLLM worker for /models/m \(tasks arc_easy, piqa\) exited with code 9 "
                                          r"while evaluating arc_easy, piqa, without answering$"):
        tp.evaluate("/models/m")
    tp = _lm_eval_pool(fakes, monkeypatch, "lm_eval_hangs", timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"^lm-eval vLLM worker for /models/m \(tasks arc_easy, piqa\) gave no answer "
                                          r"within 2s while evaluating arc_easy, piqa; killed it"):
        tp.evaluate("/models/m")
    assert time.monotonic() - t0 < 30
    tp = _lm_eval_pool(fakes, monkeypatch, "lm_eval_reports")
    with pytest.raises(WorkerError, match=r"^lm-eval with vLLM failed on /models/m \(tasks arc_easy, piqa\): "
                                          r"ValueError: no GPU memory left$"):
        tp.evaluate("/models/m")
    tp = _lm_eval_pool(fakes, monkeypatch, "lm_eval_ok")
    assert tp.evaluate("/models/m") == {"arc_easy/acc": 0.5, "args": 1.0}  # dtype auto reached the worker, hf block did not


def test_lm_eval_backend_keys_are_routed():
    from dare_lab.taskpool.lm_eval_pool import LMEvalTaskPool

    tp = _compose("taskpool=lm_eval", "taskpool.backend.name=vllm")
    assert tp.backend_name == "vllm" and tp.backend_opts["dtype"] == "auto" and "timeout_s" in tp.backend_opts
    tp = _compose("taskpool=lm_eval_open_llm_leaderboard")
    assert tp.backend_opts == {"batch_size": "auto", "dtype": "bfloat16"}
    with pytest.raises(ValueError, match=r"^lm-eval backend 'hf' does not take 'tensor_parallel_size'"):
        LMEvalTaskPool(["x"], backend={"name": "hf", "tensor_parallel_size": 2})


# --- 3. left truncation ------------------------------------------------------------------------------

LONG = "Natalia sold clips to 48 of her friends in April and half as many in May. " * 12
PROMPT = f"### Instruction:\n{LONG}\n\n### Response:"


def test_hf_max_input_tokens_keeps_the_end_of_the_prompt(tiny):
    be = HFBackend(tiny.base, batch_size=2, max_input_tokens=24)
    seen = []
    real = be.model.generate

    def spy(**kw):
        seen.append(kw["input_ids"])
        return real(**kw)

    be.model.generate = spy
    out = be.generate([PROMPT, "short"], 3)
    assert len(out) == 2
    ids = seen[0][0].tolist()
    tok = be.tokenizer
    assert len(ids) == 24 and len(tok(PROMPT)["input_ids"]) > 100
    assert tok.decode(ids, skip_special_tokens=True).endswith("### Response:")
    assert not tok.decode(ids, skip_special_tokens=True).startswith("### Instruction")


def test_vllm_max_input_tokens_sends_the_last_tokens(fake_vllm, tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.base)
    cut = _truncate_left(tok, [PROMPT, "short"], 24)
    assert cut[1] == "short" and list(cut[0]) == ["prompt_token_ids"] and len(cut[0]["prompt_token_ids"]) == 24
    assert tok.decode(cut[0]["prompt_token_ids"]).endswith("### Response:")
    assert cut[0]["prompt_token_ids"] == tok(PROMPT)["input_ids"][-24:]
    be = VLLMBackend(tiny.base, max_input_tokens=24, poll_s=0.2)
    try:
        be.generate([PROMPT, "short"], 4)
    finally:
        be.close()
    sent = [c for c in fake_vllm() if c["event"] == "generate"][0]["prompts"]
    assert sent == cut


def test_taskpool_names_the_task_when_its_worker_dies(fake_vllm, monkeypatch, tiny, tmp_path):
    from dare_lab.taskpool.generation import GenerationTaskPool

    src = tmp_path / "gsm8k.jsonl"
    src.write_text(json.dumps({"question": "What is 2 + 40?", "answer": "#### 42"}))
    monkeypatch.setenv("FAKE_VLLM_MODE", "generate:exit")
    tp = GenerationTaskPool([{"name": "gsm8k", "source": str(src)}], backend={"name": "vllm", "vllm": {"poll_s": 0.2}})
    with pytest.raises(WorkerError, match=r"^task gsm8k: vLLM worker for \S+ exited with code 7 while generating 1 "
                                          r"completions \(max_new_tokens 1024\), without answering$"):
        tp.evaluate(tiny.base)
