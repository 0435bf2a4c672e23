"""Preference data: loading, formats, tokenisation, collation, pair generation."""
