"""Load YAML configs, apply `a.b.c=value` overrides, and validate against the dataclasses.

A config file may start with `defaults: [other/name, ...]`: those configs are loaded first and
this file's keys are merged over them (the Hydra idiom of the reproduction guide). Every leaf
remembers the file or override it came from, so an error names it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from nestlearn.config.errors import ConfigError
from nestlearn.config.schema import RunConfig

T = TypeVar("T")
Origins = dict[str, str]

# shipped inside the package (the repository's `configs/` is a link to it), so an installed
# wheel finds them
PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no object construction


def config_search_path(extra: Path | None = None) -> list[Path]:
    """Directories searched for `NAME.yaml`: an explicit one, ./configs, then the package's."""
    paths = [p for p in (extra, Path.cwd() / "configs", PACKAGE_CONFIGS) if p is not None]
    unique: list[Path] = []
    for p in paths:
        if p.is_dir() and p.resolve() not in unique:
            unique.append(p.resolve())
    return unique


# Directories of YAML files that are not run configs, and what they are instead.
NOT_RUN_CONFIGS = {"level_clock": "a level-clock preset (nestlearn.train.level_loop.load_level_clock_preset)"}


def _yaml_names(extra: Path | None) -> set[str]:
    names: set[str] = set()
    for root in config_search_path(extra):
        names.update(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))
    return names


def available_configs(extra: Path | None = None) -> list[str]:
    """Names accepted by `--config-name`, e.g. `transformer/pilot_smoke`."""
    return sorted(n for n in _yaml_names(extra) if n.split("/")[0] not in NOT_RUN_CONFIGS)


def other_yaml(extra: Path | None = None) -> list[str]:
    """The shipped YAML files that are not run configs (``NOT_RUN_CONFIGS``)."""
    return sorted(n for n in _yaml_names(extra) if n.split("/")[0] in NOT_RUN_CONFIGS)


def find_config(name: str, extra: Path | None = None) -> Path:
    """Resolve `NAME` (or `dir/NAME`, or a path to a .yaml file) to a file."""
    direct = Path(name)
    if direct.suffix in (".yaml", ".yml") and direct.is_file():
        return direct
    stem = name.removesuffix(".yaml")
    if stem.split("/")[0] in NOT_RUN_CONFIGS and stem in _yaml_names(extra):
        raise ConfigError("--config-name", name, "a run config (nestlearn configs lists them)",
                          hint=f"{stem} is {NOT_RUN_CONFIGS[stem.split('/')[0]]}, not a run config")
    for root in config_search_path(extra):
        exact = root / f"{stem}.yaml"
        if exact.is_file():
            return exact
        matches = sorted(root.rglob(f"{stem}.yaml")) if "/" not in stem else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            found = ", ".join(m.relative_to(root).with_suffix("").as_posix() for m in matches)
            raise ConfigError("--config-name", name, f"one config, but it is ambiguous: {found}")
    known = available_configs(extra)
    close = difflib.get_close_matches(stem, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known) or 'none'}"
    raise ConfigError("--config-name", name, "the name of a config under configs/", hint=hint)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ConfigError("<file>", str(path), f"valid YAML{at}", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("<file>", type(data).__name__, "a mapping at the top level", source=str(path))
    return data


def _merge(base: dict[str, Any], update: dict[str, Any], origins: Origins, source: str,
           prefix: str = "") -> None:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, origins, source, f"{path}.")
        else:
            base[key] = value
            _mark(value, origins, source, path)


def _mark(value: Any, origins: Origins, source: str, path: str) -> None:
    origins[path] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(v, origins, source, f"{path}.{k}")


def _load_tree(path: Path, origins: Origins, extra: Path | None, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError("defaults", chain, "configs without a cycle", source=str(path))
    raw = _read_yaml(path)
    defaults = raw.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError("defaults", defaults, "a list of config names", source=str(path))
    tree: dict[str, Any] = {}
    for name in defaults:
        base_path = find_config(name, extra)
        _merge(tree, _load_tree(base_path, origins, extra, (*seen, path.resolve())), origins,
               str(base_path))
    # Re-merging a base re-marks its keys with the base's path, which is the true origin.
    _merge(tree, raw, origins, str(path))
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError("<override>", text, "the form key.path=value (e.g. train.steps=200)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("+")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("<override>", text, "the form key.path=value (e.g. train.steps=200)")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str], origins: Origins) -> None:
    for text in overrides:
        parts, value = parse_override(text)
        node = tree
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts), text, "a key inside a section", source="override")
            node = child
        node[parts[-1]] = value
        _mark(value, origins, f"override '{text}'", ".".join(parts))


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, origins: Origins) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else coerces."""
    origin = get_origin(tp)
    src = origins.get(key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping", source=src)
        return build(typing.cast(type, tp), value, origins, prefix=f"{key}.")
    if origin is Literal:
        if value not in get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            hint = f"did you mean {close[0]}?" if close else ""
            raise ConfigError(key, value, _type_name(tp), source=src, hint=hint)
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, origins)
            except ConfigError:
                continue
        raise ConfigError(key, value, _type_name(tp), source=src)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, value, _type_name(tp), source=src)
        (item,) = get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", {**origins, f"{key}[{i}]": src or ""})
                for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false", source=src)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer", source=src)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "a number", source=src)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string", source=src)
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def build(cls: type[T], tree: dict[str, Any], origins: Origins | None = None, prefix: str = "") -> T:
    """Construct dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    origins = origins or {}
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(typing.cast(Any, cls))]
    kwargs: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"accepted: {', '.join(names)}"
            raise ConfigError(full, value, f"a known key of '{prefix.rstrip('.') or 'the config'}'",
                              source=origins.get(full), hint=hint)
        kwargs[key] = _convert(value, hints[key], full, origins)
    return cls(**kwargs)


def load_config(name: str | None = None, overrides: list[str] | None = None,
                config_dir: Path | None = None) -> RunConfig:
    """The resolved, validated run config for `--config-name NAME` plus overrides."""
    origins: Origins = {}
    tree: dict[str, Any] = {}
    source = "defaults"
    if name is not None:
        path = find_config(name, config_dir)
        source = str(path)
        tree = _load_tree(path, origins, config_dir, ())
    apply_overrides(tree, overrides or [], origins)
    cfg = build(RunConfig, tree, origins)
    try:
        cfg.check()
    except ConfigError as exc:
        raise exc.with_source(origins.get(exc.key, source)) from None
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


PREDATED: dict[tuple[str, ...], Any] = {("model", "self_ref", "curvature_step"): False}
"""Options a saved config may predate, with the value that reproduces what it was trained with
(a default that changed behaviour when the option came in)."""


def from_dict(tree: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved by `to_dict` (e.g. a checkpoint's config.json); an option it
    predates takes its ``PREDATED`` value, not today's default."""
    tree = copy.deepcopy(tree)
    for path, value in PREDATED.items():
        node: Any = tree
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] not in node:
            node[path[-1]] = value
    cfg = build(RunConfig, tree, {})
    cfg.check()
    return cfg


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)
