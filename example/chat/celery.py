"""The demo's Celery app (Celery's Django recipe, unchanged): its broker is
``CELERY_BROKER_URL = "dmb://"``, the same broker as the channel layer.

    celery -A chat worker -l info        (run_demo.py starts one)
"""

from __future__ import annotations

import os

from celery import Celery

# The Django app registers dmb:// once Django is set up (the site, workers,
# beat); this line also covers Celery's tools that do not set Django up
# (celery inspect, purge, events).
import django_message_broker.celery  # noqa: F401

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chat.settings")

app = Celery("chat")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
