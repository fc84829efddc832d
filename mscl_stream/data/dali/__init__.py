"""DALI decode engines (placeholder docstring, completed in the next commit)."""
