"""Git's protocols: sans-I/O upload-pack and receive-pack engines, the planners that read the stores, and the upload-pack service."""

__all__: list[str] = []
