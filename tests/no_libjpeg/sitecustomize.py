"""Run Python as if pylibjpeg-libjpeg were not installed: its module and entry points are hidden."""

import importlib.metadata as _md
import sys


class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "libjpeg" or name.startswith("libjpeg."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Block())
_entry_points = _md.entry_points


def _filtered(**params):
    found = _entry_points(**params)
    return _md.EntryPoints(ep for ep in found if ep.value.split(":")[0].split(".")[0] != "libjpeg")


_md.entry_points = _filtered
