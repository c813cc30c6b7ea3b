"""Django app config. Importing or readying the app starts nothing: the
broker starts from ``runbroker``, ``python -m django_message_broker serve``,
or on first use of the layer (the embedded default). ``ready()`` registers
the system checks and, if kombu is installed, the ``dmb://`` scheme with
kombu (one entry in its table of transport names: nothing connects), so
that in a set-up Django process (the site, a Celery worker, beat)
``CELERY_BROKER_URL = "dmb://"`` needs no other line."""

from __future__ import annotations

from django.apps import AppConfig


class DjangoMessageBrokerConfig(AppConfig):
    name = "django_message_broker"
    verbose_name = "Django Message Broker"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks

        try:
            from kombu.transport import TRANSPORT_ALIASES
        except ImportError:  # no kombu, no Celery: nothing to register
            return
        TRANSPORT_ALIASES.setdefault("dmb", "django_message_broker.celery:Transport")
