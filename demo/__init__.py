"""The demo's own code, outside the library: the offline gettext corpus and the small base model trained on it."""
