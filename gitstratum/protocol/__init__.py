"""Sans-I/O Git protocol engines: upload-pack and receive-pack."""

__all__: list[str] = []
