"""Fakes and conformance test mixins shipped with the package, for every implementation."""

__all__: list[str] = []
