"""Catch bad command-line overrides before any job starts, with one line naming the valid choices.

Hydra's own messages for a wrong group option, a misspelt key or an unparsable value are
several lines long and exit with status 1; values of the wrong type are not caught at all
(``engine.threads=two`` composes fine and fails deep inside the run). :func:`check_overrides`
composes the configuration the way ``dare-lab`` will (every value of a sweep at least once)
and raises :class:`OverrideError` with one line, e.g.::

    unknown method 'dare_tie' (method=dare_tie); choose one of: average, dare_average, ...
    unknown config key 'engine.thread'; did you mean 'engine.threads'? valid keys under 'engine': ...
    engine.threads=two: expected an integer (default 2)
    unknown parameter 'drop_rat' of method (dare_lab.ops.presets.build_method); did you mean 'drop_rate'? ...

Anything it does not recognise as an override error is left to Hydra.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import itertools
import json
import math
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
_MAX_VARIANTS = 12


class OverrideError(ValueError):
    """A command-line override that names no config key/option or has the wrong type."""


class PreflightError(OverrideError):
    """An input of one job of the run or sweep (a model, a data file, a method value) is unusable."""


# Numeric/boolean settings whose documented default may be replaced by null (none today: a null
# drop rate used to become the preset's default silently; now it is an error naming the key).
NULLABLE: frozenset[str] = frozenset()

# Settings that are booleans wherever they appear (also in nested blocks no ``_target_`` types,
# such as a generation backend's options): a string like "false" is never accepted for them.
BOOL_NAMES = frozenset({"trust_remote_code", "overwrite", "progress", "force", "linear_only", "rescale",
                        "weighted_election", "normalize_fisher", "regression", "enabled"})
BOOL_OR_WORDS = {"rescale": ("l1",)}
"""Boolean settings that also take these words (a sparsifier's ``rescale: l1``, mergekit's rule)."""


def _word(key: Any, value: Any) -> bool:
    return isinstance(value, str) and value in BOOL_OR_WORDS.get(str(key), ())


def _groups(config_dir: str) -> list[str]:
    return sorted(p.name for p in Path(config_dir).iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _options(config_dir: str, group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config_dir) / group).glob("*.yaml"))


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _variants(overrides: Sequence[str], groups: set[str]) -> tuple[list[list[str]], list[tuple[str, bool, Any]]]:
    """What to check: override lists to compose (first value of every sweep, then each other
    choice of a config-group sweep once) and the other values of plain-key sweeps
    (key, is_add, value), checked against the first composition without composing again."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    firsts: list[str] = []
    alternatives: list[tuple[int, str]] = []
    values: list[tuple[str, bool, Any]] = []
    for i, o in enumerate(parsed):
        if not o.is_sweep_override():
            firsts.append(o.input_line)
            continue
        prefix = o.input_line[: len(o.input_line) - len(o.input_line.lstrip("+~"))]
        strings = list(o.sweep_string_iterator())
        if not strings:
            raise OverrideError(f"sweep override {o.input_line!r} has no values")
        firsts.append(f"{prefix}{o.key_or_group}={strings[0]}")
        if o.key_or_group in groups or o.key_or_group.startswith("hydra"):
            alternatives += [(i, f"{prefix}{o.key_or_group}={v}") for v in strings[1:]]
        else:
            values += [(o.key_or_group, o.is_add(), v) for v in list(o.sweep_iterator())[1:]]
    out = [firsts]
    for i, line in alternatives[: _MAX_VARIANTS - 1]:
        out.append([*firsts[:i], line, *firsts[i + 1:]])
    return out, values[: 4 * _MAX_VARIANTS]


def _defaults_for(variant: Sequence[str], config_dir: str, compose) -> Any:
    """The config with the same group choices but no value overrides (the types to expect)."""
    groups = set(_groups(config_dir))
    chosen = tuple(o for o in variant if o.split("=", 1)[0].lstrip("+~") in groups and "=" in o)
    cache = getattr(compose, "cache", None)
    if cache is not None and chosen in cache:
        return cache[chosen]
    try:
        cfg = compose(chosen)
    except Exception:  # noqa: BLE001
        cfg = compose([])
    if cache is not None:
        cache[chosen] = cfg
    return cfg


def _kind(value: Any) -> str:
    from omegaconf import DictConfig, ListConfig

    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (DictConfig, Mapping)):
        return "dict"
    if isinstance(value, (ListConfig, list, tuple)):
        return "list"
    return "none" if value is None else type(value).__name__


_EXPECT = {"bool": "true or false", "int": "an integer", "float": "a number", "dict": "a config group/mapping",
           "list": "a list like [a,b]", "str": "a string"}
_ALLOWED = {"bool": {"bool"}, "int": {"int"}, "float": {"float", "int"}, "dict": {"dict"}, "list": {"list"},
            "str": {"str", "int", "float", "bool"}}


def _show(value: Any) -> str:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, dict):
        return "{" + ", ".join(map(str, value)) + "}"
    if value is None or isinstance(value, bool):   # as a Hydra override spells them
        return {None: "null", True: "true", False: "false"}[value]
    text = str(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def check_types(cfg: Any, defaults: Any, prefix: str = "") -> None:
    """Every value whose default is a bool/number/list/mapping must keep that kind."""
    from omegaconf import DictConfig

    if not isinstance(cfg, DictConfig) or not isinstance(defaults, DictConfig):
        return
    for key in cfg.keys():
        if key == "hydra" or key not in defaults:
            continue
        full = f"{prefix}{key}"
        from omegaconf import OmegaConf

        if OmegaConf.is_interpolation(cfg, key) or OmegaConf.is_interpolation(defaults, key):
            continue  # resolved later
        try:
            kv, kd = _kind(cfg[key]), _kind(defaults[key])
        except Exception:  # noqa: BLE001
            continue
        if kv == "none" and kd in ("bool", "int", "float") and full not in NULLABLE:
            raise OverrideError(f"{full}=null: expected {_EXPECT[kd]} (default {_show(defaults[key])}); "
                                f"null is not a value of this setting")
        if kv == "float" and math.isnan(cfg[key]):
            raise OverrideError(f"{full}=nan: expected {_EXPECT.get(kd, 'a number')}, not NaN (default {_show(defaults[key])})")
        if kd in ("none",) or kv == "none" or kd not in _ALLOWED:
            continue
        if kv not in _ALLOWED[kd] and not (kd == "bool" and _word(key, cfg[key])):
            words = BOOL_OR_WORDS.get(str(key), ()) if kd == "bool" else ()
            expect = f"true, false or {' or '.join(words)}" if words else _EXPECT[kd]
            raise OverrideError(f"{full}={_show(cfg[key])}: expected {expect} (default {_show(defaults[key])})")
        if kd == "dict":
            check_types(cfg[key], defaults[key], f"{full}.")


def _target_callable(path: str):
    module, _, name = str(path).rpartition(".")
    obj = importlib.import_module(module)
    return getattr(obj, name)


def _simple_kinds(annotation: Any) -> set[str] | None:
    """{'int', 'float', ...} for plain scalar annotations (and their Optionals), else None."""
    names = {int: "int", float: "float", bool: "bool", str: "str", type(None): "none"}
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else (annotation,)
    kinds = set()
    for a in args:
        if a not in names:
            return None
        kinds.add(names[a])
    return kinds


def check_targets(cfg: Any, prefix: str = "") -> None:
    """Keys of every ``_target_`` node must be parameters of the target (unless it takes **kwargs),
    with the right scalar type where the parameter is annotated int/float/bool/str."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            check_targets(item, f"{prefix}{i}.")
        return
    if not isinstance(cfg, DictConfig):
        return
    target = cfg.get("_target_") if "_target_" in cfg else None
    if target is not None:
        try:
            fn = _target_callable(target)
            sig = inspect.signature(fn)
            hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
        except Exception:  # noqa: BLE001 - an unimportable target is reported by the run itself
            sig, hints = None, {}
        if sig is not None:
            params = {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
            open_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
            where = prefix.rstrip(".") or "config"
            for key in cfg.keys():
                key = str(key)
                if key.startswith("_") and key.endswith("_"):
                    continue
                if key not in params:
                    if not open_kwargs:
                        valid = ", ".join(params)
                        raise OverrideError(f"unknown parameter {key!r} of {where} ({target}); {_suggest(key, params)}valid: {valid}")
                    continue
                kinds = _simple_kinds(hints.get(key))
                if not kinds:
                    continue
                if OmegaConf.is_interpolation(cfg, key):
                    continue
                raw = cfg[key]
                got = _kind(raw)
                ok = (got in kinds or (got == "int" and "float" in kinds)
                      or (got in ("int", "float", "bool") and "str" in kinds))
                if not ok:
                    want = " or ".join(sorted(_EXPECT.get(k, k) if k != "none" else "null" for k in kinds))
                    raise OverrideError(f"{prefix}{key}={_show(raw)}: expected {want} ({target} parameter {key!r})")
    for key in cfg.keys():
        if key == "hydra":
            continue
        try:
            child = cfg._get_node(key)  # noqa: SLF001
        except Exception:  # noqa: BLE001
            continue
        if isinstance(child, (DictConfig, ListConfig)):
            check_targets(child, f"{prefix}{key}.")


def _translate(exc: BaseException, variant: Sequence[str], config_dir: str, compose) -> OverrideError | None:
    """Hydra's composition errors → one line with the valid choices (None: not an override error)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf import DictConfig

    if isinstance(exc, MissingConfigException):
        missing = str(exc.missing_cfg_file or "")
        group, _, option = missing.rpartition("/")
        options = list(exc.options or (_options(config_dir, group) if group else []))
        if group and option:
            given = next((o for o in variant if o.lstrip("+~").split("=", 1)[0] == group), f"{group}={option}")
            return OverrideError(f"unknown {group} {option!r} ({given}); {_suggest(option, options)}choose one of: {', '.join(options)}")
        first = str(exc).strip().splitlines()[0]
        return OverrideError(first)
    if isinstance(exc, OverrideParseException):
        first = str(exc).strip().splitlines()[0]
        return OverrideError(f"cannot parse the overrides: {first}")
    if isinstance(exc, ConfigCompositionException):
        msg = str(exc).strip().splitlines()
        cause = exc.__cause__
        full_key = getattr(cause, "full_key", None) if cause is not None else None
        if msg and msg[0].startswith("Could not override") and full_key:
            parent_key, _, leaf = str(full_key).rpartition(".")
            base = _defaults_for(variant, config_dir, compose)
            node = base
            for part in parent_key.split(".") if parent_key else []:
                node = node.get(part) if isinstance(node, DictConfig) else None
            if isinstance(node, DictConfig):
                keys = [str(k) for k in node.keys() if k != "hydra"]
                if not parent_key:
                    keys = sorted(set(keys) | set(_groups(config_dir)))
                where = f"under {parent_key!r}" if parent_key else "at the top level"
                return OverrideError(f"unknown config key {full_key!r}; {_suggest(leaf, keys)}valid keys {where}: "
                                     f"{', '.join(keys)} (use +{full_key}=... to add a new key)")
            return OverrideError(f"unknown config key {full_key!r} (use +{full_key}=... to add a new key)")
        first = " ".join(line.strip() for line in msg[:2])
        if cause is not None:
            first += f" ({str(cause).strip().splitlines()[0]})"
        return OverrideError(first)
    return None


def check_settings(cfg: Any, prefix: str = "") -> None:
    """Typed settings wherever they are: a :data:`BOOL_NAMES` key holds true, false or null
    (never a string such as ``"false"``), and no number is NaN. Raises :class:`OverrideError`
    naming the key as written on the command line (``taskpool.backend.hf.trust_remote_code``)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, ListConfig):
        for i, item in enumerate(cfg):
            check_settings(item, f"{prefix}{i}.")
        return
    if not isinstance(cfg, DictConfig):
        return
    for key in cfg.keys():
        if key == "hydra" or OmegaConf.is_interpolation(cfg, key) or OmegaConf.is_missing(cfg, key):
            continue
        try:
            value = cfg[key]
        except Exception:  # noqa: BLE001 - an unresolvable value is the run's to report
            continue
        full = f"{prefix}{key}"
        if str(key) in BOOL_NAMES and value is not None and not isinstance(value, (bool, DictConfig)) \
                and not _word(key, value):
            raise OverrideError(f"{full}={_show(value)}: expected true or false, got a {_kind(value)} "
                                f"(a string is never a boolean)")
        if isinstance(value, float) and math.isnan(value):
            raise OverrideError(f"{full}=nan: expected a number, not NaN")
        if isinstance(value, (DictConfig, ListConfig)):
            check_settings(value, f"{full}.")


def _root_error(exc: BaseException) -> BaseException:
    """The user's error inside ``exc`` (Hydra wraps errors raised by ``_target_`` calls)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ValueError, OSError, TypeError, KeyError)) and type(seen).__module__ != "hydra.errors":
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def _line(exc: BaseException) -> str:
    err = _root_error(exc)
    if isinstance(err, OSError) and err.errno is not None and err.filename is not None:
        return f"{err.strerror}: {err.filename}"
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(msg.split())


def _no_op_preflight(obj: Any) -> bool:
    fn = getattr(obj, "preflight", None)
    if fn is None:
        return True
    from dare_lab.taskpool.base import TaskPool

    return getattr(fn, "__func__", fn) is TaskPool.preflight


_PLAIN_POOL = "dare_lab.engine.pool.ModelPool"


def preflight_job(cfg: Any, cache: dict | None = None) -> None:
    """Check one job's inputs without any heavy step; raise ValueError/OSError (one line) on a bad one.

    - the method builds (every value in range, none without effect on the chosen method);
    - a plain model pool's base and models open (local dir or offline-cached hub id, headers parse);
    - the taskpool's own :meth:`~dare_lab.taskpool.base.TaskPool.preflight`: data files exist and
      parse with the right schema, hub datasets are available offline, label counts match heads.

    Packaged pools that build their models on first use are not built here; their taskpool is
    checked without a pool (data only). ``cache`` dedupes identical sections across a sweep.
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    cache = {} if cache is None else cache
    check_settings(cfg)

    def key(*sections: str) -> str:
        return json.dumps([OmegaConf.to_container(cfg[s], resolve=True) if isinstance(cfg.get(s), DictConfig) else None
                           for s in sections], sort_keys=True, default=str)

    method = cfg.get("method")
    if isinstance(method, DictConfig) and "_target_" in method:
        k = ("method", key("method"))
        if k not in cache:
            instantiate(method, _convert_="all")
            cache[k] = True
    pool = None
    mp = cfg.get("modelpool")
    if isinstance(mp, DictConfig) and mp.get("_target_") == _PLAIN_POOL:
        k = ("pool", key("modelpool"))
        if k not in cache:
            from dare_lab.engine.lora import open_model
            from dare_lab.engine.sources import CheckpointReader

            pool = instantiate(mp, _convert_="all")
            base_reader = CheckpointReader(pool.base, label="base")
            for name, ref in pool.models.items():
                open_model(ref, name, base_reader)  # full checkpoints and LoRA adapter directories
            cache[k] = pool
        pool = cache[k]
    tp = cfg.get("taskpool")
    if isinstance(tp, DictConfig) and tp.get("_target_"):
        try:
            cls = _target_callable(tp["_target_"])
        except Exception:  # noqa: BLE001 - an unimportable target is reported by the run itself
            return
        if _no_op_preflight(cls):
            return
        k = ("taskpool", key("taskpool", "modelpool"))
        if k not in cache:
            taskpool = instantiate(tp, _convert_="all")
            taskpool.preflight(pool)
            cache[k] = True


_MAX_JOBS = 256


def _jobs(overrides: Sequence[str], groups: set[str]) -> list[tuple[list[str], list[tuple[str, bool, Any]], str]]:
    """Every job of a sweep as (overrides to compose, plain-key values to set, label); the full
    cartesian product up to :data:`_MAX_JOBS` jobs, else each value of each sweep once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    axes: list[list[tuple[str | None, tuple[str, bool, Any] | None, str]]] = []
    for o in parsed:
        if not o.is_sweep_override():
            axes.append([(o.input_line, None, "")])
            continue
        prefix = o.input_line[: len(o.input_line) - len(o.input_line.lstrip("+~"))]
        strings = list(o.sweep_string_iterator())
        if not strings:
            raise OverrideError(f"sweep override {o.input_line!r} has no values")
        if o.key_or_group in groups or o.key_or_group.startswith("hydra"):
            axes.append([(f"{prefix}{o.key_or_group}={v}", None, f"{o.key_or_group}={v}") for v in strings])
        else:
            values = list(o.sweep_iterator())
            axes.append([(f"{prefix}{o.key_or_group}={strings[0]}", None if i == 0 else (o.key_or_group, o.is_add(), v),
                          f"{o.key_or_group}={strings[i]}") for i, v in enumerate(values)])
    total = math.prod(len(a) for a in axes)
    if total <= _MAX_JOBS:
        combos = list(itertools.product(*axes))
    else:  # each value once, the others at their first value
        combos = [tuple(a[0] for a in axes)]
        for i, a in enumerate(axes):
            for choice in a[1:]:
                combos.append(tuple(choice if j == i else b[0] for j, b in enumerate(axes)))
    multi = total > 1
    out = []
    for n, combo in enumerate(combos):
        compose_with = [c[0] for c in combo]
        values = [c[1] for c in combo if c[1] is not None]
        label = " ".join(c[2] for c in combo if c[2])
        out.append((compose_with, values, f"job {n} ({label})" if multi and total <= _MAX_JOBS else
                    (f"sweep value ({label})" if multi else "")))
    return out


def preflight_overrides(overrides: Sequence[str], config_name: str = "config", config_dir: str = CONFIG_DIR) -> int:
    """Compose every job of ``overrides`` (a run: one job; a sweep: all of them) and check each
    job's inputs with :func:`preflight_job` before any job starts. Raises :class:`PreflightError`
    naming the job; returns the number of jobs checked. Call after :func:`check_overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    GlobalHydra.instance().clear()
    n = 0
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            composed: dict[tuple[str, ...], Any] = {}
            cache: dict = {}
            for compose_with, values, label in _jobs(overrides, set(_groups(config_dir))):
                base_key = tuple(compose_with)
                if base_key not in composed:
                    try:
                        composed[base_key] = hydra_compose(config_name, overrides=list(compose_with))
                    except Exception:  # noqa: BLE001 - composition problems are check_overrides' / Hydra's
                        return n
                cfg = composed[base_key].copy()
                for k, is_add, v in values:
                    with open_dict(cfg):
                        OmegaConf.update(cfg, k, v, merge=False, force_add=is_add)
                with open_dict(cfg):
                    cfg.pop("hydra", None)
                try:
                    preflight_job(cfg, cache)
                except (ValueError, OSError, TypeError, KeyError) as exc:
                    where = f"{label}: " if label else ""
                    raise PreflightError(f"{where}{_line(exc)}") from None
                except Exception as exc:  # noqa: BLE001 - Hydra's instantiate wraps the target's error
                    root = _root_error(exc)
                    if root is exc:
                        raise
                    where = f"{label}: " if label else ""
                    raise PreflightError(f"{where}{_line(root)}") from None
                n += 1
    finally:
        GlobalHydra.instance().clear()
    return n


def check_overrides(overrides: Sequence[str], config_name: str = "config", config_dir: str = CONFIG_DIR) -> None:
    """Compose every variant of ``overrides``; raise :class:`OverrideError` (one line) on a bad one.

    Hydra override errors and values of the wrong type are reported; every other problem is
    left for the run itself (and for Hydra) to report.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import OverrideParseException
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            def compose(ovs):
                return hydra_compose(config_name, overrides=list(ovs))

            compose.cache = {}
            try:
                variants, values = _variants(overrides, set(_groups(config_dir)))
            except OverrideParseException as exc:
                raise _translate(exc, overrides, config_dir, compose) from None
            for n, variant in enumerate(variants):
                try:
                    cfg = compose(variant)
                except Exception as exc:  # noqa: BLE001
                    err = _translate(exc, variant, config_dir, compose)
                    if err is None:
                        return
                    raise err from None
                defaults = _defaults_for(variant, config_dir, compose)
                check_types(cfg, defaults)
                check_targets(cfg)
                if n == 0:
                    for key, is_add, value in values:  # the other values of plain-key sweeps
                        other = cfg.copy()
                        OmegaConf.update(other, key, value, merge=False, force_add=is_add)
                        check_types(other, defaults)
                        check_targets(other)
    finally:
        GlobalHydra.instance().clear()
