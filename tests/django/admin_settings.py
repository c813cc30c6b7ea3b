"""Settings for ``admin_stats_tests`` (the admin stats page), run by
``test_admin_stats_page.py`` with Django's own test runner in a subprocess:
tests/django/settings.py (the layer on ``DMB_TEST_ADDRESS``) plus the admin
and what it needs, and a file-based sqlite database in ``DMB_TEST_DB_DIR``
(the live server test case refuses an in-memory one)."""

import os

from settings import *  # noqa: F403

_db_dir = os.environ["DMB_TEST_DB_DIR"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_message_broker",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
ROOT_URLCONF = "admin_urls"
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_db_dir, "admin.sqlite3"),
        "TEST": {"NAME": os.path.join(_db_dir, "test_admin.sqlite3")},
    }
}
