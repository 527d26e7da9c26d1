"""Backbone seam (filled below)."""
