"""Fakes and conformance test mixins shipped with the package, for every implementation.

The conformance mixins (``conformance``, ``cache_conformance``) are pytest
classes and need the ``test`` extra (``pip install 'gitstratum[test]'``);
nothing else in the package imports pytest.
"""

__all__: list[str] = []
