"""The backend layer: validated model specs, and the one function per role that loads them.

- :mod:`.spec`: :class:`PolicySpec`, :class:`PRMSpec` (pydantic; no torch);
- :mod:`.load`: :func:`load_policy`, :func:`load_prm` (torch and transformers only for a
  local model, httpx only for a URL), :func:`served_model`, :func:`describe`.

``itscale.load_policy`` / ``itscale.load_prm`` are these functions.
"""

from .load import check_placement, describe, load_policy, load_prm, served_model
from .spec import PolicySpec, PRMSpec, is_url

__all__ = ["PRMSpec", "PolicySpec", "check_placement", "describe", "is_url", "load_policy", "load_prm", "served_model"]
