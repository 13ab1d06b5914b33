"""Bundled example model for amq (see README.md); not part of the amq package."""
