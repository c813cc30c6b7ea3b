"""URLs of the admin stats page: add, before the admin's own URLs,
``path("admin/broker/", include("django_message_broker.urls"))``."""

from __future__ import annotations

from django.urls import path

from .admin_views import stats_data, stats_page

app_name = "django_message_broker"

urlpatterns = [
    path("", stats_page, name="stats"),
    path("data/", stats_data, name="stats-data"),
]
