"""Presets: a YAML file from `configs/` (which may `base:` another) plus `key=value` overrides -> a checked Config.

`config.py` checks each field on its own; the names that registries own are checked here, one layer above them:
`impl.attention` against kernels.attention, `impl.moe_impl` against model.moe_backends, `mesh.rules` against the
logical-axis table of parallel.sharding. A new backend or logical axis is then one registry entry, nothing more.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib

import yaml

from dsv3_jax.config import Config, ImplConfig, _unknown, apply_overrides, from_dict
from dsv3_jax.errors import ConfigError
from dsv3_jax.kernels import attention
from dsv3_jax.model.moe import MOE_IMPLS
from dsv3_jax.parallel.sharding import rules_for

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def resolve_preset(name_or_path: str) -> pathlib.Path:
    """A preset name (`tiny`, `small`, ...) or a YAML path."""
    p = pathlib.Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"config file {name_or_path} does not exist")
        return p
    q = CONFIG_DIR / f"{name_or_path}.yaml"
    if not q.exists():
        presets = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name_or_path, presets, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; presets: {', '.join(presets)}"
        raise ConfigError(f"unknown preset {name_or_path!r}{hint}")
    return q


def load_config(name_or_path: str = "small", overrides: list[str] = ()) -> Config:
    """Load a YAML preset (which may `base:` another preset), then apply overrides and validate."""
    path = resolve_preset(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    cfg = load_config(base) if base else Config()
    merged = dataclasses.asdict(cfg)
    for section, values in raw.items():
        if section not in merged:
            raise _unknown(section, list(merged), "")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for k, v in values.items():
            if k not in merged[section]:
                raise _unknown(k, list(merged[section]), section + ".")
            merged[section][k] = v
    return check_names(apply_overrides(from_dict(Config, merged).validate(), list(overrides)))


def check_names(cfg: Config) -> Config:
    """`cfg` if every registry-owned name in it is known, else a one-line ConfigError naming the field."""
    check_impl(cfg.impl)
    rules_for(cfg.mesh)
    return cfg


def check_impl(impl: ImplConfig) -> ImplConfig:
    """`impl` if its attention and MoE backends are registered, else a one-line ConfigError naming the field."""
    if impl.attention not in attention.NAMES:
        raise ConfigError(f"impl.attention must be one of {list(attention.NAMES)}, got {impl.attention!r}")
    if impl.moe_impl not in MOE_IMPLS:
        raise ConfigError(f"impl.moe_impl must be one of {sorted(MOE_IMPLS)}, got {impl.moe_impl!r}")
    return impl
