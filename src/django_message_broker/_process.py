"""What a client tells the broker about its process (``Hello``'s ``host``,
``pid`` and ``name``), for the broker's stats."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Optional

__all__ = ["HOST", "hello_fields", "process_name"]

HOST = socket.gethostname()[:255]


def process_name(argv: Optional[list[str]] = None) -> str:
    """This process as a person would name it: its command line with the
    program's directory left out (``manage.py runworker``, ``uvicorn
    mysite.asgi:application``), at most 120 characters. ``python -m
    package`` shows as that."""
    argv = list(sys.argv if argv is None else argv) or ["python"]
    program = os.path.basename(argv[0]) or "python"
    if program == "__main__.py":
        program = "python -m " + os.path.basename(os.path.dirname(argv[0]))
    text = " ".join([program, *argv[1:]])
    return text if len(text) <= 120 else text[:119] + "…"


def hello_fields() -> dict[str, Any]:
    """``Hello``'s ``host``, ``pid`` and ``name`` keywords, now (the pid
    changes in a forked child)."""
    return {"host": HOST, "pid": os.getpid(), "name": process_name()}
