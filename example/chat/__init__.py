"""The demo chat site: rooms are Channels groups on django-message-broker."""
