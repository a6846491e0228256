"""Longtail Introspection: compare captions of guided and unguided images to find longtail words."""
