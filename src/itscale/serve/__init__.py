"""``itscale serve``: an OpenAI-compatible server that applies a method per request.

Modules, in the order a request meets them:

- :mod:`.auth`: API keys (flag, environment, key file with per-key limits), constant-time check;
- :mod:`.schemas`: the request bodies (pydantic), and which OpenAI fields are refused;
- :mod:`.methods`: method names, aliases and model-name suffixes (``tiny:pf-16``);
- :mod:`.jobs`: method, budget, limits and sampling of one request;
- :mod:`.admission`: bounded concurrency, queue and 429 back-pressure;
- :mod:`.engine`: the shared, batched backends and one strategy run per request;
- :mod:`.responses`: OpenAI bodies, stream chunks and usage from a result;
- :mod:`.app`: the FastAPI routes and the life of a request; :mod:`.server`: start-up;
- :mod:`.config`, :mod:`.errors`, :mod:`.metrics`: settings, OpenAI-shaped errors, ``/metrics``.

Nothing here is imported by the rest of the library; FastAPI and uvicorn are only
needed to run the server (``pip install 'itscale[serve]'``).
"""

from .config import EMBEDDED_NAME, Limits, ServeConfig

__all__ = ["EMBEDDED_NAME", "Limits", "ServeConfig"]
