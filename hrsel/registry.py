"""Build components by name: `SCORERS.build("dps", **kwargs)`."""
from __future__ import annotations

import difflib
from typing import Any, Callable

from hrsel.errors import ConfigError


class Registry:
    """A named table of builders; an unknown name lists the valid ones.

    A prefix resolver serves a whole family of names: after
    `BACKBONES.register_prefix("timm/")(resolve)`, `BACKBONES.get("timm/resnet50")` returns
    `resolve("resnet50")`, a builder (or a ConfigError naming the close names).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        self._prefixes: dict[str, Callable[[str], Callable[..., Any]]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return add

    def register_prefix(self, prefix: str) -> Callable[[Callable[[str], Any]], Callable[[str], Any]]:
        """Names `prefix<rest>` resolve to `resolver(rest)`; the resolver raises ConfigError for unknown ones."""
        def add(resolver: Callable[[str], Any]) -> Callable[[str], Any]:
            if prefix in self._prefixes:
                raise ValueError(f"{self.kind} prefix {prefix!r} is registered twice")
            self._prefixes[prefix] = resolver
            return resolver

        return add

    def _prefix_of(self, name: Any) -> str | None:
        return next((p for p in self._prefixes if isinstance(name, str) and name.startswith(p)), None)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def get(self, name: str) -> Callable[..., Any]:
        prefix = self._prefix_of(name)
        if prefix is not None:
            return self._prefixes[prefix](name[len(prefix):])
        if name not in self._builders:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            families = "".join(f", {p}<name>" for p in self._prefixes)
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}{families}.{hint}"
            )
        return self._builders[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._builders or self._prefix_of(name) is not None
