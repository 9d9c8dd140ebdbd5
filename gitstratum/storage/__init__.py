"""The storage seams (``IObjectStore``, ``IMetadataStore``) and their LMDB implementations."""

__all__: list[str] = []
