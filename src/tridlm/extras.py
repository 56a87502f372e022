"""Which optional extra installs a missing module, read from tridlm's own metadata (pyproject.toml's extras).

The base install runs inference only; a command that needs more fails with the extra to install instead of
a bare ModuleNotFoundError.
"""

from __future__ import annotations

import re
from importlib import metadata

# the extra a command's own work needs; others are named by whichever extra lists the missing module
COMMAND_EXTRAS = {"serve": "server", "bench": "bench", "eval": "eval", "train": "train", "convert": "convert"}
IMPORT_NAMES = {"pyyaml": "yaml", "llama-cpp-python": "llama_cpp"}  # where the import name is not the project's
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9._-]+)(?:\[([^\]]*)\])?[^;]*;\s*extra\s*==\s*['\"]([^'\"]+)['\"]")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_modules() -> dict[str, set[str]]:
    """Each extra -> the top-level modules it installs directly, its own extras (`tridlm[x]`) included."""
    try:
        requirements = metadata.requires("tridlm") or []
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return {}
    modules: dict[str, set[str]] = {}
    nested: dict[str, set[str]] = {}
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if not match:
            continue
        project, extras, extra = _normalized(match[1]), match[2], match[3]
        modules.setdefault(extra, set())
        if project == "tridlm":
            nested.setdefault(extra, set()).update(e.strip() for e in (extras or "").split(","))
        else:
            modules[extra].add(IMPORT_NAMES.get(project, project.replace("-", "_")))

    def expand(extra: str, seen: frozenset = frozenset()) -> set[str]:
        found = set(modules.get(extra, ()))
        for inner in nested.get(extra, set()) - seen:
            found |= expand(inner, seen | {extra})
        return found

    return {extra: expand(extra) for extra in modules}


def missing_extra_hint(command: str, module: str | None) -> str | None:
    """'tridlm serve needs the server extra: ...' for a module an extra installs; None for any other."""
    top = (module or "").split(".")[0]
    table = extra_modules()
    preferred = COMMAND_EXTRAS.get(command)
    if preferred is None or top not in table.get(preferred, ()):
        preferred = next((e for e, found in table.items() if top in found and e != "test"), None)
    if preferred is None:
        return None
    return f"tridlm {command} needs the {preferred} extra: pip install 'tridlm[{preferred}]' (no module named {top})"
