"""URLs for ``admin_settings``: the admin, and the broker's stats page the
way the README says to add it."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/broker/", include("django_message_broker.urls")),
    path("admin/", admin.site.urls),
]
