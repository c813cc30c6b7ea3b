"""Settings of the demo chat site (no database, no static files).

The one setting that matters is ``CHANNEL_LAYERS``: every process started
with these settings (both uvicorn workers and ``worker.py``) talks to the
broker at ``DMB_ADDRESS``; the first one to use it starts it (the embedded
default for a loopback address).
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "channels",
    "django_message_broker",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "chat.urls"
ASGI_APPLICATION = "chat.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]

# No models: an in-memory database keeps Django content without a file.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "django_message_broker.ChannelsServerLayer",
        "CONFIG": {"address": os.environ.get("DMB_ADDRESS", "tcp://127.0.0.1:5556")},
    }
}

# Celery on the same broker: "dmb://" is the broker of CHANNEL_LAYERS above
# (one setting switches a site between it and "redis://..."; the app in
# INSTALLED_APPS registers the scheme with kombu).
CELERY_BROKER_URL = "dmb://"
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Base URLs of all the demo's web servers (set by run_demo.py), to link
# the same room on each of them.
DEMO_SERVERS = [url for url in os.environ.get("DEMO_SERVERS", "").split(",") if url]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "django_message_broker": {"handlers": ["console"], "level": "INFO"},
        "chat": {"handlers": ["console"], "level": "INFO"},
    },
}
