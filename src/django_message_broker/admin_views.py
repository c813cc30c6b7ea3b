"""A page in the Django admin with the broker's live stats (issue #13 item 2).

One line in the project's ``urls.py``, before the admin's own::

    path("admin/broker/", include("django_message_broker.urls")),

``stats_page`` (staff only; others go to the admin's login) renders the
admin-styled page; its inline script polls ``stats_data`` once a second and
redraws the numbers, the channel and client tables, and an SVG chart of
messages per second over the last five minutes (the broker's own per-second
history, so a page opened late still shows the past). No static files, no
CDN. ``stats_data`` (staff only: 403 otherwise) answers ``stats(top=20)``
of the broker that ``CHANNEL_LAYERS["default"]`` names, as JSON, or a 503
with the reason when no broker answers. It never starts an embedded broker.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.cache import never_cache

from .client import SyncClient
from .exceptions import AuthenticationFailed, BrokerError, BrokerUnavailable
from .options import LayerOptions

__all__ = ["stats_data", "stats_page"]

#: Channels and clients listed; the rest are summed.
TOP = 20
#: Seconds a poll waits for the broker (the page polls every second).
TIMEOUT = 2.0
ALIAS = "default"

_lock = threading.Lock()
_client: Optional[SyncClient] = None
_client_key: Any = None


def _stats_client() -> SyncClient:
    """One client per process for the layer's broker (rebuilt if the
    settings change, as in tests)."""
    global _client, _client_key
    config = (getattr(settings, "CHANNEL_LAYERS", {}) or {}).get(ALIAS, {}).get("CONFIG", {})
    options = LayerOptions.from_config(config or {}).client
    key = (options.address, options.server_key, options.client_key)
    with _lock:
        if _client is None or _client_key != key:
            if _client is not None:
                _client.close()
            _client = SyncClient(
                options.address,
                timeout=min(options.timeout, TIMEOUT),
                server_key=options.server_key,
                client_key=options.client_key,
            )
            _client_key = key
        return _client


def _is_staff(request: HttpRequest) -> bool:
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


@never_cache
def stats_data(request: HttpRequest) -> HttpResponse:
    """The broker's detailed stats as JSON, for staff."""
    if not _is_staff(request):
        return JsonResponse({"error": "staff only"}, status=403)
    try:
        client = _stats_client()
        detail = client.stats(top=TOP)
    except BrokerUnavailable:
        return JsonResponse({"error": f"no broker answered at {client.address} within {client.timeout:g}s"}, status=503)
    except (AuthenticationFailed, BrokerError, TypeError, ValueError, OSError) as exc:
        return JsonResponse({"error": f"cannot read the broker's stats: {exc}"}, status=503)
    detail["address"] = client.address
    return JsonResponse(detail)


@staff_member_required
@never_cache
def stats_page(request: HttpRequest) -> HttpResponse:
    """The live page (admin look), for staff."""
    context = {
        **admin.site.each_context(request),
        "title": "Message broker",
        "data_url": reverse("django_message_broker:stats-data"),
    }
    return render(request, "django_message_broker/admin_stats.html", context)
