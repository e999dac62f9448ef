"""The one place that turns config nodes into objects (``hydra.utils.instantiate``): a node resolved to plain data,
and its ``_target_`` (old paths mapped by ``train_seg.config.legacy``) built with the constructor's own error
message, or a ``ConfigError`` naming the key."""
from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from train_seg.config.legacy import current_targets
from train_seg.config.validation import ConfigError


def plain_node(node, key: str) -> dict:
    """Resolves a config node into a plain dict, turning a missing mandatory value into a ConfigError."""
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True) if isinstance(node, DictConfig) else dict(node)
    except MissingMandatoryValue as exc:
        missing = f"{key}.{exc.key}" if getattr(exc, "key", None) else key
        raise ConfigError(f"{missing} is required but not set: pass it on the command line, e.g. `{missing}=...`.") from exc


def instantiate_node(spec: dict, key: str, **kwargs):
    """``hydra.utils.instantiate`` of ``spec`` (the node at ``key``). A constructor's own ValueError or
    FileNotFoundError comes out unwrapped (its one-paragraph message); a TypeError (a wrong keyword) or any other
    failure becomes a ConfigError naming ``key``. Old ``_target_`` paths are mapped first (``config.legacy``)."""
    spec = current_targets(dict(spec))
    try:
        return instantiate(spec, **kwargs, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError, TypeError)):
            if isinstance(cause, TypeError):
                raise ConfigError(f"{key}: {cause}. Check the keys of `{key}` (see the config file's comments).") from cause
            raise cause
        raise ConfigError(f"{key}: could not build {spec.get('_target_')!r}: {exc}") from exc
