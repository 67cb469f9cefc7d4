"""What the three registries (generator architectures, readers, tasks) share: entries by name, the built-in ones
imported on first use from the module BUILTIN names, and a user's "package.module:name", whose module registers it
when imported (big_vision's pattern). The one place that imports by a computed name (tests/test_layout.py)."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Iterable, Mapping


class Registry:
    """Entries (objects with a `name`) of one kind. `builtin` maps each built-in name to its module; `aliases` maps
    old names to current ones; `noun` and `module` word the error of an unknown name."""

    def __init__(self, builtin: Mapping[str, str], noun: str, module: str, aliases: Mapping[str, str] | None = None):
        self.builtin, self.noun, self.module, self.aliases = builtin, noun, module, dict(aliases or {})
        self._entries: dict[str, Any] = {}

    def register(self, entry: Any) -> Any:
        """Adds (or replaces) `entry` under its name."""
        self._entries[entry.name] = entry
        return entry

    def _split(self, name: str) -> tuple[str | None, str]:
        """("package.module", "entry") of "package.module:entry"; (BUILTIN module or None, name) of a plain name
        (an alias resolved)."""
        if ":" in name:
            module, _, entry = name.partition(":")
            return module, entry
        name = self.aliases.get(name, name)
        return self.builtin.get(name), name

    def known(self, name: Any) -> bool:
        """Whether `name` can name an entry, without importing anything heavy (for the config and flag checks)."""
        if not isinstance(name, str) or not name:
            return False
        if name in self._entries:
            return True
        module, entry = self._split(name)
        if module is None or not entry:
            return False
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    def names(self) -> list[str]:
        """The built-in names and those registered so far."""
        return sorted(set(self.builtin) | set(self._entries))

    def get(self, name: str) -> Any:
        """The entry `name` names (a built-in, a registered name, an alias or `package.module:name`). Raises
        ValueError naming the known ones."""
        if name not in self._entries:
            module, name = self._split(name)
            if module is not None:
                importlib.import_module(module)
        if name not in self._entries:
            raise ValueError(f"no {self.noun} {name!r}; known: {', '.join(self.names())} (or 'package.module:name' "
                             f"of a module that registers one with {self.module}.register)")
        return self._entries[name]

    def entries(self) -> Iterable[Any]:
        """The entries registered so far (the built-ins once something has asked for them)."""
        return list(self._entries.values())
