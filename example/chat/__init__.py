"""The demo chat site: rooms are Channels groups on django-message-broker,
and Celery tasks run on the same broker."""

from .celery import app as celery_app

__all__ = ["celery_app"]
