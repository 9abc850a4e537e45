"""The ``dare-lab`` entry point: Hydra composes the config, a program runs it.

Every run writes its resolved ``config.yaml`` and ``metrics.json`` into its run directory
and prints where. Bad input ends the run with one line on stderr, exit status 2, and no run
directory left behind.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dare_lab.results import write_atomic, write_json

CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")  # dare_lab/configs -> ../configs
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


def run_job(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        program = load_program(cfg.program)
        metrics = program(cfg, run_dir)
    except Exception as exc:  # noqa: BLE001 - reported as one line below
        err = user_error(exc)
        if err is None:
            raise
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"dare-lab: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json(run_dir / "metrics.json", metrics)
    shown = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
    for key, value in shown.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"dare-lab: results in {run_dir} (config.yaml, metrics.json)")
    return metrics


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_job(cfg)


if __name__ == "__main__":
    main()
