"""The admin stats page's template (issue #13 item 2) loads nothing from
elsewhere and writes data only as text: channel names, hosts and process
names come from clients."""

from __future__ import annotations

import re
from pathlib import Path

import django_message_broker

TEMPLATE = Path(django_message_broker.__file__).parent / "templates" / "django_message_broker" / "admin_stats.html"


def test_no_cdn_no_files_no_html_from_data():
    text = TEMPLATE.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "load nothing from another site"
    assert "<script src" not in text and "<link" not in text
    assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text
    assert "textContent" in text
