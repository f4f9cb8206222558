"""Integrations with training frameworks (imported on demand; the ops never import these)."""
