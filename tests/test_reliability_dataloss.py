"""Issue 14, the shell's part: a run deletes only what it created; every input of every job is
checked before the first heavy step; two runs or sweeps sharing a directory never destroy each
other; run identities follow pool order; settings are typed; environment errors are one line.

Each test drives ``dare-lab`` the way a user does (a child process, in a directory whose path
has a space) on the session's tiny BERT pool (tests/conftest.py)."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# A child that runs dare-lab after optional fault injection (FAULT=<kind>:<path part>).
CHILD = r"""
import errno, os, sys, time
fault = os.environ.get("FAULT", "")
kind, _, where = fault.partition(":")
if kind == "slow_write":  # every shard write sleeps: a merge that lasts a while
    _pwrite = os.pwrite
    def slow(fd, data, offset):
        time.sleep(float(where or 0.05))
        return _pwrite(fd, data, offset)
    os.pwrite = slow
if kind == "hold":  # each merge waits (holding its directory) until the file `where` exists
    import dare_lab.programs.merge as m
    _merge_pool = m.merge_pool
    def held(*a, **k):
        print("HOLDING", flush=True)
        t = time.monotonic()
        while not os.path.exists(where) and time.monotonic() - t < 120:
            time.sleep(0.05)
        return _merge_pool(*a, **k)
    m.merge_pool = held
if kind == "enospc_write":  # the disk fills up while the merged model is written
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.pwrite = full
if kind in ("erofs_mkdir", "eacces_mkdir"):  # the run directory cannot be created
    import pathlib
    code = errno.EROFS if kind == "erofs_mkdir" else errno.EACCES
    _mkdir = pathlib.Path.mkdir
    def mkdir(self, *a, **k):
        if where in str(self):
            raise OSError(code, os.strerror(code), str(self))
        return _mkdir(self, *a, **k)
    pathlib.Path.mkdir = mkdir
if kind == "enospc_hydra":  # the disk is full when Hydra writes its own .hydra/config.yaml
    import builtins
    _open = builtins.open
    def full_open(f, *a, **k):
        if ".hydra" in str(f) and "w" in (a[0] if a else k.get("mode", "r")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return _open(f, *a, **k)
    builtins.open = full_open
if kind == "eval_enospc":  # evaluation fails with a full disk after a finished merge
    import dare_lab.taskpool.classification as c
    def evaluate(self, model_dir, pool):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(model_dir) + "/scores.json")
    c.ClassificationTaskPool.evaluate = evaluate
import dare_lab.shell.cli as cli
sys.argv = ["dare-lab", *sys.argv[1:]]
cli.main()
"""


@pytest.fixture()
def work(tmp_path):
    d = tmp_path / "user dir"  # a path with a space
    d.mkdir()
    return d


def env_for(work, **extra):
    env = {**os.environ, **ENV, "DARE_LAB_CACHE": str(work / "cache"), **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def dare_lab(args, cwd, fault="", skip_precheck=False, timeout=300, **extra):
    extra = {**extra, "FAULT": fault}
    if skip_precheck:
        extra["DARE_LAB_SKIP_PRECHECK"] = "1"
    return subprocess.run([sys.executable, "-c", CHILD, *args], cwd=cwd, env=env_for(cwd, **extra),
                          capture_output=True, text=True, timeout=timeout)


def pool_args(pool, bad=None):
    b = bad or pool.models["ft1"]
    return ["modelpool=custom", f"modelpool.base={pool.base}",
            f"+modelpool.models={{a: {pool.models['ft0']}, b: {b}}}", "output.progress=false"]


def one_line_exit_2(r, *parts):
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "HYDRA_FULL_ERROR" not in r.stderr, r.stderr
    lines = [ln for ln in err if ln.startswith("dare-lab: error:")]
    assert len(lines) == 1, err
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


def tree(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*"))


# ----------------------------------------------------------------- 1. data loss


@pytest.mark.parametrize("skip_precheck", [False, True], ids=["precheck", "run-time"])
def test_hydra_run_dir_with_user_files_survives_an_error(tiny_bert_pool, work, skip_precheck):
    """`hydra.run.dir=.` (the user's own directory) and a typo: nothing of the user's goes, nor the dir."""
    (work / "notes.txt").write_text("precious")
    (work / "sub").mkdir()
    (work / "sub" / "data.csv").write_text("a,b\n")
    before = tree(work)
    r = dare_lab([*pool_args(tiny_bert_pool, bad=str(work / "no-such-model")), "hydra.run.dir=."], work,
                 skip_precheck=skip_precheck)
    one_line_exit_2(r, "no-such-model")
    assert tree(work) == before  # no .hydra, no log, no lock file left; the user's files intact


def test_rerun_into_a_fixed_run_dir_keeps_the_previous_results(tiny_bert_pool, work):
    run_dir = work / "fixed run"
    ok = dare_lab([*pool_args(tiny_bert_pool), f"hydra.run.dir={run_dir}"], work)
    assert ok.returncode == 0, ok.stderr[-3000:]
    previous = {p: (run_dir / p).read_bytes() for p in ("metrics.json", "config.yaml", "run.json",
                                                       "merged/dare_lab_merge.json")}
    for skip in (False, True):
        r = dare_lab([*pool_args(tiny_bert_pool, bad="/no/such/model"), f"hydra.run.dir={run_dir}"], work,
                     skip_precheck=skip)
        one_line_exit_2(r, "/no/such/model")
        for p, data in previous.items():
            assert (run_dir / p).read_bytes() == data, p
        assert (run_dir / "merged" / "model.safetensors").is_file()


def test_resume_never_clears_another_runs_results(tiny_bert_pool, work):
    """resume.enabled=true into a fixed run dir holding another identity's results: they stay."""
    run_dir = work / "fixed"
    a = dare_lab([*pool_args(tiny_bert_pool), "method.drop_rate=0.1", "resume.enabled=true",
                  f"hydra.run.dir={run_dir}"], work)
    assert a.returncode == 0, a.stderr[-3000:]
    previous = {p: (run_dir / p).read_bytes() for p in ("metrics.json", "run.json", "merged/dare_lab_merge.json")}
    b = dare_lab([*pool_args(tiny_bert_pool), "method.drop_rate=0.5", "resume.enabled=true",
                  f"hydra.run.dir={run_dir}"], work)
    one_line_exit_2(b, "merged")  # the engine refuses to replace the other run's model
    for p, data in previous.items():
        assert (run_dir / p).read_bytes() == data, p


def classification_args(tmp, test_file, labels="[l0, l1]", model="a"):
    return ["taskpool=classification",
            f"taskpool.tasks=[{{name: t, files: {{test: '{test_file}'}}, labels: {labels}, model: {model}}}]"]


def write_csv(path, n=6):
    path.write_text("text,label\n" + "".join(f"word{i} word{i + 1},l{i % 2}\n" for i in range(n)))
    return path


def test_merged_model_survives_an_evaluation_error(tiny_bert_pool, work):
    """Disk full while scoring, after the merge finished: the model stays and its path is printed."""
    data = write_csv(work / "test.csv")
    run_dir = work / "run"
    r = dare_lab([*pool_args(tiny_bert_pool), *classification_args(work, data), f"hydra.run.dir={run_dir}"], work,
                 fault="eval_enospc")
    line = one_line_exit_2(r, "ENOSPC", "scores.json")
    assert "no space left on device" in line
    merged = run_dir / "merged"
    assert (merged / "dare_lab_merge.json").is_file() and (merged / "model.safetensors").is_file()
    assert f"the merged model is complete and kept: {merged}" in r.stderr
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["merged"] == str(merged)
    assert not (run_dir / "metrics.json").exists()


def test_merged_model_outside_the_run_dir_survives_an_evaluation_error(tiny_bert_pool, work):
    data = write_csv(work / "test.csv")
    out = work / "models" / "merged model"
    r = dare_lab([*pool_args(tiny_bert_pool), *classification_args(work, data), f"output.model_dir={out}",
                  f"hydra.run.dir={work / 'run'}"], work, fault="eval_enospc")
    one_line_exit_2(r, "ENOSPC")
    assert (out / "dare_lab_merge.json").is_file()
    assert f"kept: {out}" in r.stderr


# ----------------------------------------------------------------- 2. preflight before the first heavy step


@pytest.mark.parametrize("case,expected", [
    ("list_of_lists", "row 0 is a JSON array, expected an object"),
    ("missing_file", "data file does not exist"),
    ("wrong_column", "column 'text' not found"),
    ("labels_vs_head", "has 5 labels but model"),
    ("label_id_vs_head", "does not fit the 2-way head"),
    ("no_head_model", "model pool has no model 'zz'"),
    ("bad_jsonl_line", ":2: a JSON array, expected an object"),
])
def test_taskpool_inputs_fail_before_the_merge(tiny_bert_pool, work, case, expected):
    data = write_csv(work / "test.csv")
    labels, model = "[l0, l1]", "a"
    if case == "list_of_lists":
        data = work / "test.json"
        data.write_text(json.dumps([["some text", 0], ["more text", 1]]))
    elif case == "missing_file":
        data = work / "nope.csv"
    elif case == "wrong_column":
        data.write_text("sentence,label\nhello,l0\n")
    elif case == "labels_vs_head":
        labels = "[l0, l1, l2, l3, l4]"
    elif case == "label_id_vs_head":
        data.write_text("text,label\nhello,0\nworld,7\n")
        labels = "null"
    elif case == "no_head_model":
        model = "zz"
    elif case == "bad_jsonl_line":
        data = work / "test.jsonl"
        data.write_text('{"text": "a", "label": "l0"}\n["b", "l1"]\n')
    # the pre-check before Hydra; for two cases also the program's own check before the merge
    for skip in (False, True) if case in ("list_of_lists", "labels_vs_head") else (False,):
        run_dir = work / f"run-{skip}"
        r = dare_lab([*pool_args(tiny_bert_pool), *classification_args(work, data, labels, model),
                      f"hydra.run.dir={run_dir}"], work, skip_precheck=skip)
        one_line_exit_2(r, expected)
        assert "merged model written" not in r.stdout  # refused before the merge
        assert not run_dir.exists()


@pytest.mark.parametrize("values,method,expected", [
    ("0.1,nan,0.5", "dare_task_arithmetic", "method.drop_rate=nan"),
    ("0.1,0.5,1.5", "dare_task_arithmetic", "drop rate p=1.5 is outside"),
    ("0.0,0.5", "task_arithmetic", "has no effect"),
])
def test_every_sweep_value_is_checked_before_job_0(tiny_bert_pool, work, values, method, expected):
    sweep = work / "sweep"
    r = dare_lab(["-m", *pool_args(tiny_bert_pool), f"method={method}", f"method.drop_rate={values}",
                  f"hydra.sweep.dir={sweep}"], work)
    one_line_exit_2(r, expected)
    assert not sweep.exists()  # job 0 never started


def test_a_bad_model_in_any_sweep_job_fails_before_job_0(tiny_bert_pool, work):
    sweep = work / "sweep"
    r = dare_lab(["-m", "modelpool=custom", f"modelpool.base={tiny_bert_pool.base},{work / 'gone'}",
                  f"+modelpool.models={{a: {tiny_bert_pool.models['ft0']}}}", f"hydra.sweep.dir={sweep}"], work)
    one_line_exit_2(r, "job 1", "gone")
    assert not sweep.exists()


def test_null_drop_rate_is_an_error_not_the_default(tiny_bert_pool, work):
    for skip in (False, True):
        r = dare_lab([*pool_args(tiny_bert_pool), "method.drop_rate=null", f"hydra.run.dir={work / 'r'}"], work,
                     skip_precheck=skip)
        one_line_exit_2(r, "drop_rate")
        assert not (work / "r").exists()


# ----------------------------------------------------------------- 3. concurrency


def start_holding(args, work, release):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=work, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env_for(work, FAULT=f"hold:{release}"))
    for line in proc.stdout:  # the first merge has started: the directory is in use
        if "HOLDING" in line:
            return proc
    raise AssertionError(proc.stderr.read()[-3000:])


def test_two_sweeps_into_one_directory_one_refuses_at_once_the_other_completes(tiny_bert_pool, work):
    sweep = work / "shared sweep"
    release = work / "release"
    args = ["-m", *pool_args(tiny_bert_pool), "method.drop_rate=0.1,0.3", f"hydra.sweep.dir={sweep}"]
    first = start_holding(args, work, release)
    try:
        started = time.monotonic()
        second = dare_lab(args, work)
        one_line_exit_2(second, "in use by another dare-lab run or sweep", str(sweep))
        assert time.monotonic() - started < 60
        assert first.poll() is None  # the refusal did not disturb the running sweep
        release.touch()
        out, err = first.communicate(timeout=300)
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "run.json").read_text())["status"] == "complete"
        assert (sweep / job / "merged" / "dare_lab_merge.json").is_file()
    assert not list(sweep.rglob(".*.tmp-*"))
    assert not (sweep / ".dare_lab.lock").exists()


def test_two_runs_into_one_fixed_run_dir(tiny_bert_pool, work):
    run_dir = work / "fixed"
    release = work / "release"
    args = [*pool_args(tiny_bert_pool), f"hydra.run.dir={run_dir}"]
    first = start_holding(args, work, release)
    try:
        second = dare_lab(args, work)
        one_line_exit_2(second, "in use")
        release.touch()
        out, err = first.communicate(timeout=300)
    finally:
        release.touch()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert (run_dir / "merged" / "dare_lab_merge.json").is_file()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_two_sweeps_with_default_directories_started_together_both_complete(tiny_bert_pool, work):
    args = ["-m", *pool_args(tiny_bert_pool), "method.drop_rate=0.1,0.3", "experiment_name=same"]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=work, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env_for(work)) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    sweeps = [d for d in (work / "results" / "sweeps" / "same").iterdir() if not d.name.startswith(".")]
    assert len(sweeps) == 2  # two directories, even within one second
    for s in sweeps:
        assert sorted(p.name for p in s.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]


# ----------------------------------------------------------------- 4. run identity


def test_order_permuted_pools_with_positional_weights_have_distinct_identities():
    from dare_lab.shell.run_identity import run_id

    def cfg(models, weights):
        return OmegaConf.create({"program": "dare_lab.programs.merge:run",
                                 "modelpool": {"_target_": "dare_lab.engine.pool.ModelPool", "base": "/m/base",
                                               "models": models},
                                 "method": {"name": "task_arithmetic", "weights": weights, "seed": 0}})

    ab = cfg({"a": "/m/a", "b": "/m/b"}, [1.0, 2.0])
    ba = cfg({"b": "/m/b", "a": "/m/a"}, [1.0, 2.0])  # weight 1.0 now belongs to b: another merge
    assert run_id(ab) != run_id(ba)
    assert run_id(ab) == run_id(cfg({"a": "/m/a", "b": "/m/b"}, [1.0, 2.0]))  # stable
    assert run_id(ba) == run_id(cfg({"b": "/m/b", "a": "/m/a"}, [1.0, 2.0]))


def test_resumed_sweep_does_not_reuse_a_permuted_pools_result(tiny_bert_pool, work):
    """The same pool listed in another order with positional weights is merged again, not skipped."""
    a, b = tiny_bert_pool.models["ft0"], tiny_bert_pool.models["ft1"]
    common = ["modelpool=custom", f"modelpool.base={tiny_bert_pool.base}", "method=task_arithmetic",
              "method.weights=[1.0,0.25]", "output.progress=false", "resume.enabled=true"]
    r1 = dare_lab([*common, f"+modelpool.models={{a: {a}, b: {b}}}", f"hydra.run.dir={work / 'r1'}"], work)
    r2 = dare_lab([*common, f"+modelpool.models={{b: {b}, a: {a}}}", f"hydra.run.dir={work / 'r2'}"], work)
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr[-2000:], r2.stderr[-2000:])
    assert "already complete" not in r2.stdout
    id1 = json.loads((work / "r1" / "run.json").read_text())["run_id"]
    id2 = json.loads((work / "r2" / "run.json").read_text())["run_id"]
    assert id1 != id2
    assert (work / "r2" / "merged" / "dare_lab_merge.json").is_file()


# ----------------------------------------------------------------- 5. typed settings


@pytest.mark.parametrize("override,key", [
    ("+taskpool.backend.hf.trust_remote_code='false'", "taskpool.backend.hf.trust_remote_code"),
    ("output.overwrite='false'", "output.overwrite"),
    ("engine.scope.linear_only='false'", "engine.scope.linear_only"),
    ("resume.force='no'", "resume.force"),
    ("engine.threads='2'", "engine.threads"),
    ("method.scaling=nan", "method.scaling"),
])
def test_strings_are_never_booleans_or_numbers(tiny_bert_pool, work, override, key):
    # the pre-check before Hydra; for the first three also the run's own checks (DARE_LAB_SKIP_PRECHECK=1)
    runtime = key in ("taskpool.backend.hf.trust_remote_code", "output.overwrite", "engine.scope.linear_only")
    for skip in (False, True) if runtime else (False,):
        r = dare_lab([*pool_args(tiny_bert_pool), override, f"hydra.run.dir={work / 'r'}"], work, skip_precheck=skip)
        one_line_exit_2(r, key)
        assert not (work / "r").exists()


def test_typed_setting_unit():
    from dare_lab.programs.merge import typed_setting

    cfg = OmegaConf.create({"output": {"overwrite": "false", "n": True, "x": 1}})
    with pytest.raises(ValueError, match=r"^output.overwrite='false': expected true or false, got a string$"):
        typed_setting(cfg, "output.overwrite", bool)
    with pytest.raises(ValueError, match="expected an integer"):
        typed_setting(cfg, "output.n", int)
    assert typed_setting(cfg, "output.x", float) == 1.0
    assert typed_setting(cfg, "output.missing", bool, default=False) is False


# ----------------------------------------------------------------- 6. environment errors: one line, exit 2


def test_disk_full_while_writing_the_model(tiny_bert_pool, work):
    run_dir = work / "run"
    r = dare_lab([*pool_args(tiny_bert_pool), f"hydra.run.dir={run_dir}"], work, fault="enospc_write")
    one_line_exit_2(r, "ENOSPC")
    assert not run_dir.exists()


@pytest.mark.parametrize("fault,name", [("erofs_mkdir", "EROFS"), ("eacces_mkdir", "EACCES")])
def test_run_dir_on_a_read_only_or_forbidden_file_system(tiny_bert_pool, work, fault, name):
    run_dir = work / "ro" / "run"
    r = dare_lab([*pool_args(tiny_bert_pool), f"hydra.run.dir={run_dir}"], work, fault=f"{fault}:{work / 'ro'}")
    one_line_exit_2(r, name, str(work / "ro"))
    assert not run_dir.exists()


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "user-dir"])
def test_disk_full_in_hydras_own_steps(tiny_bert_pool, work, existing):
    """ENOSPC while Hydra writes .hydra/ (before the job runs): one line, and only the run's files go."""
    run_dir = work / "run"
    if existing:
        run_dir.mkdir()
        (run_dir / "mine.txt").write_text("keep")
    r = dare_lab([*pool_args(tiny_bert_pool), f"hydra.run.dir={run_dir}"], work, fault="enospc_hydra")
    one_line_exit_2(r, "ENOSPC", ".hydra")
    assert (tree(run_dir) == ["mine.txt"]) if existing else not run_dir.exists()


def test_hydra_full_error_still_shows_nothing_for_user_errors(tiny_bert_pool, work):
    r = subprocess.run([sys.executable, "-c", CHILD, *pool_args(tiny_bert_pool, bad="/gone"),
                        f"hydra.run.dir={work / 'r'}"], cwd=work, capture_output=True, text=True, timeout=300,
                       env={**env_for(work), "DARE_LAB_SKIP_PRECHECK": "1", "FAULT": ""})
    one_line_exit_2(r, "/gone")


def test_os_error_line():
    from dare_lab.shell.sweep import os_error_line

    assert os_error_line(OSError(errno.EROFS, "Read-only file system", "/x/y")) == "read-only file system (EROFS): /x/y"
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device")).endswith("(ENOSPC)")
