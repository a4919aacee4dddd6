"""The z-score and norm arithmetic of dot-product scores, shared by every model that z-scores them in one dot
product (the fused Laser, ``laser_core.model``; the lexical hybrid, ``laser_core.lexical``) and by the bundle that
makes such scores rankable by a cosine (``laser_core.bundle.augment_rows``).

Each function takes numpy arrays or torch tensors alike (only methods both have), so this module imports no
torch: serving loads it.

For scores ``s_i = u . v_i`` over rows ``v_i`` with mean ``m`` and covariance ``C`` (``ddof`` 1, as
``laser_core.hybrid.zscore``), the per-user z-score is ``u . (v_i - m) / sqrt(u^T C u)``: :func:`row_statistics`
gives ``m`` and ``C``, :func:`per_user_sd` the denominator. :func:`norm_column` is the extra column that makes
rows of different norms equally long, so the cosine with ``[u, 0]`` ranks as the dot product.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: the smallest per-user standard deviation a score is divided by (``laser_core.hybrid.zscore``'s: a user whose
#: scores are all equal gets z = 0)
SD_EPS = 1e-8


def _is_tensor(x: Any) -> bool:
    return not isinstance(x, np.ndarray) and hasattr(x, "double")


def _sqrt(x: Any) -> Any:
    return x.sqrt() if _is_tensor(x) else np.sqrt(x)


def row_statistics(rows: Any) -> tuple[Any, Any]:
    """The mean ``[d]`` and covariance ``[d, d]`` (``ddof`` 1) of ``rows`` ``[n, d]``, computed in float64 and
    returned as float32 of the input's kind (torch tensors on the input's device, or numpy arrays): then
    ``sqrt(u^T C u)`` is exactly the standard deviation of the scores ``u . rows_i`` that the z-score divides by."""
    if rows.shape[0] < 2:
        raise ValueError(f"z-score statistics need at least 2 catalogue rows, got {rows.shape[0]}")
    x = rows.double() if _is_tensor(rows) else np.asarray(rows, dtype=np.float64)
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (x.shape[0] - 1)
    if _is_tensor(x):
        return mean.float(), cov.float()
    return mean.astype(np.float32), cov.astype(np.float32)


def per_user_sd(u: Any, cov: Any) -> Any:
    """``[B, 1]``: each user row's score standard deviation over the rows whose covariance is ``cov``,
    ``sqrt(u^T C u)``, at least :data:`SD_EPS`."""
    return _sqrt(((u @ cov) * u).sum(-1)[..., None].clip(min=SD_EPS**2))


def norm_column(sq_norms: Any, bound_sq: Any) -> Any:
    """``sqrt(max(bound_sq - sq_norms, 0))``: the column that lengthens each row of squared norm ``sq_norms`` to
    the common squared norm ``bound_sq``."""
    return _sqrt((bound_sq - sq_norms).clip(min=0.0))
