"""The tested matrix (``make test-matrix``): the suite on every supported
pair of Python and Django, each Django with the Channels it supports.

- ``full``: the whole suite on Python 3.11 with Django 5.2 (the pair
  ``make test`` uses in .venv, with channels_redis's own tests).
- ``fast``: the fast suite (no ``slow`` tests, no tests/reliability) on
  every other pair. ``nox -s fast`` is what CI runs after ``make test``.

Pairs follow Django's supported Python versions: 4.2 runs on 3.8-3.12, 5.2
on 3.10-3.14, 6.0 on 3.12-3.14; we support Python 3.10-3.13. Django 4.2 is
tested with channels 4.2.2 (the oldest we allow), the others with the newest
4.x. The classifiers in pyproject.toml list exactly these versions.

Interpreters: nox looks for ``python3.X`` on PATH; the pyenv versions under
$PYENV_ROOT (default ~/.pyenv) are put first on it, so no shell setup is
needed on a machine that has them.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["full", "fast"]
nox.options.error_on_missing_interpreters = True

_PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
for _bin in sorted(_PYENV.glob("3.1[0-9].*/bin"), reverse=True):
    os.environ["PATH"] = f"{_bin}{os.pathsep}{os.environ.get('PATH', '')}"

#: Django minor version -> (Pythons it supports that we support, Channels requirement)
DJANGO = {
    "4.2": (["3.10", "3.11", "3.12"], "channels==4.2.2"),
    "5.2": (["3.10", "3.11", "3.12", "3.13"], "channels>=4.3,<5"),
    "6.0": (["3.12", "3.13"], "channels>=4.3.2,<5"),
}
FULL = ("3.11", "5.2")
PAIRS = [(python, django) for django, (pythons, _) in DJANGO.items() for python in pythons]
FAST = [pair for pair in PAIRS if pair != FULL]
PYTEST = ["-q", "-p", "no:cacheprovider"]


def _install(session: nox.Session, django: str) -> None:
    channels = DJANGO[django][1]
    session.install("-e", ".[test]", f"Django~={django}.0", channels)
    session.run("python", "-c", "import sys, django, channels; print(sys.version.split()[0], "
                "'Django', django.get_version(), 'channels', channels.__version__)")


@nox.session(python=FULL[0])
def full(session: nox.Session) -> None:
    """The whole suite, then channels_redis's own tests against our layer."""
    _install(session, FULL[1])
    session.run("pytest", *PYTEST, *session.posargs)
    session.run("python", "tests/peers/run.py", "-q")


@nox.session
@nox.parametrize(("python", "django"), FAST, ids=[f"{p}-django{d}" for p, d in FAST])
def fast(session: nox.Session, django: str) -> None:
    """The fast suite: everything but the slow tests and tests/reliability."""
    _install(session, django)
    session.run("pytest", *PYTEST, "-m", "not slow", "--ignore=tests/reliability", *session.posargs)
