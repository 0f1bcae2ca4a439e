"""Ahead-of-time memory plans: the report one plan writes and the docs table of all of them."""
