"""The one registration rule of the family adapters (VLM and teacher): a class serves the names it lists."""

from __future__ import annotations


def register(registry: dict[str, type], cls: type, names_attr: str, what: str) -> type:
    """Put `cls` in `registry` under every name of its `names_attr` attribute (model types, pipeline classes),
    `what` naming one such name in messages. Returns `cls`, for use in class decorators.

    Raises TypeError if `cls` sets no `family` or no names, ValueError if a name is already served by another
    class (registering the same class again is allowed)."""
    names = getattr(cls, names_attr, None)
    if not getattr(cls, "family", None) or not names:
        raise TypeError(f"{cls.__name__} must set `family` and `{names_attr}`")
    for name in names:
        if name in registry and registry[name] is not cls:
            raise ValueError(f"{what} {name!r} already served by {registry[name].__name__}")
        registry[name] = cls
    return cls
