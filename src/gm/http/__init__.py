"""The HTTP API (``/v1``): an aiohttp application whose handlers translate requests
into calls on the store and its actors, and back.
"""

from gm.http.app import ServerState, make_app

__all__ = ["ServerState", "make_app"]
