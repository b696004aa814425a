"""Named implementations chosen by config strings (and by `sclslt shard --layout`): one registry per kind,
on the base floor.

The module that implements a kind registers its names (`@SIMILARITY_HEADS.register("cico")`), so the
names live in one place: the config check and `--help` read them from the registry, which imports
its implementing module (`home`) the first time names are asked for. A test or a user's module can
register one more (a head defined in a test file), and `Config.validate` accepts it.
"""

from __future__ import annotations

import importlib


class Registry:
    def __init__(self, kind: str, key: str, home: str):
        self.kind, self.key, self.home = kind, key, home  # key: the config field that names one
        self._items: dict[str, object] = {}

    def register(self, name: str):
        """Decorator (or call with the object) registering `name`; a second registration of a name is an error."""

        def add(obj):
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered already ({self._items[name]!r})")
            self._items[name] = obj
            return obj

        return add

    def _load(self) -> None:
        importlib.import_module(self.home)

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._items)

    def get(self, name: str):
        self._load()
        if name not in self._items:
            raise KeyError(f"{self.key}={name!r}: no such {self.kind}; use one of {', '.join(map(repr, self._items))}")
        return self._items[name]


SIMILARITY_HEADS = Registry("similarity head", "model.similarity", "sclslt.model.heads")
SCHEDULES = Registry("curriculum schedule", "selection.schedule", "sclslt.selection.schedules")
TRACKERS = Registry("experiment tracker", "train.report_to", "sclslt.runtime.trackers")
CORPUS_LAYOUTS = Registry("corpus layout", "--layout", "sclslt.data.layouts")  # `sclslt shard`, no config field

REGISTRIES = {
    r.key: r for r in (SIMILARITY_HEADS, SCHEDULES, TRACKERS)
}  # config field -> the registry naming its values
