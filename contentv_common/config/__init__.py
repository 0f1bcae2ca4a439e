"""Typed configuration: model sizes, training recipes, reward recipes."""
