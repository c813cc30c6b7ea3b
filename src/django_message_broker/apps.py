"""Django app config. Importing or readying the app starts nothing: the
broker starts from ``runbroker``, ``python -m django_message_broker serve``,
or on first use of the layer (the embedded default)."""

from __future__ import annotations

from django.apps import AppConfig


class DjangoMessageBrokerConfig(AppConfig):
    name = "django_message_broker"
    verbose_name = "Django Message Broker"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks
