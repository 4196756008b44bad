"""Recipes: one `get_config(arg)` per file (see each file's docstring for its command)."""
