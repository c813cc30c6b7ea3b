"""The default namespace (``prefix``) of a Django project's channels and groups.

Every process of one project must meet on the broker: web workers,
``ProcessClient`` scripts, Celery workers and management commands, even
when they load different settings modules (``settings.dev``,
``settings.worker``). Two projects on one host must not meet by accident.
So the default is derived from what a project's processes share, its base
directory, and not from the settings module's name:

1. ``settings.BASE_DIR`` when the settings define it;
2. else the directory holding the top-level package of
   ``settings.SETTINGS_MODULE`` (``mysite`` of ``mysite.settings.dev``);
3. without configured Django settings (a plain script): no namespace
   (``""``). Nothing identifies a project there; give ``prefix`` explicitly.

The prefix reads ``<directory name>-<hash>``, e.g. ``mysite-3f2a9c01d4``:
the name for a human reading the broker's queues, the hash (of the real,
absolute path) so two checkouts named alike stay apart.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from typing import Any, Optional

__all__ = ["default_prefix", "prefix_for_directory", "project_directory"]

_NAME_CHARS = re.compile(r"[^a-zA-Z\d\-_]+")


def prefix_for_directory(directory: Any) -> str:
    """The namespace of the project in ``directory`` (a str or path): the
    same for every spelling of the same directory (symlinks, ``..``)."""
    path = os.path.realpath(os.fspath(directory))
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    name = _NAME_CHARS.sub("_", os.path.basename(path.rstrip(os.sep)))[:40].strip("_-") or "project"
    return f"{name}-{digest}"


def project_directory(settings: Any) -> Optional[str]:
    """The project's base directory: ``settings.BASE_DIR``, else the
    directory holding the settings module's top-level package; ``None`` if
    neither can be found."""
    base_dir = getattr(settings, "BASE_DIR", None)
    if base_dir:
        return os.fspath(base_dir)
    module = getattr(settings, "SETTINGS_MODULE", None)
    if not module:
        return None
    top = module.split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:  # a package: its parent directory
        locations = list(spec.submodule_search_locations)
        return os.path.dirname(os.path.realpath(locations[0])) if locations else None
    if spec.origin and os.path.isfile(spec.origin):  # a top-level settings.py
        return os.path.dirname(os.path.realpath(spec.origin))
    return None


def default_prefix() -> str:
    """The namespace for a layer or ``ProcessClient`` given no ``prefix``:
    the project directory's (see the module docstring), or ``""`` without
    configured Django settings."""
    try:
        from django.conf import settings

        if not settings.configured:
            return ""
        directory = project_directory(settings)
    except Exception:  # Django missing, or settings that fail to load
        return ""
    return prefix_for_directory(directory) if directory else ""
