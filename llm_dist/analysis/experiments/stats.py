"""Statistics of an experiment: means with t-intervals over seeds, paired differences with a paired t-test,
and the saturating power law err(n) = a·n^(−b) + c fitted with bootstrap intervals and judged by
extrapolation (Alabdulmohsin et al. 2022, "Revisiting neural scaling laws": fit on the smaller sizes,
predict the largest measured one).

scipy does the t-quantiles, the paired test and the least squares (nnls, minimize_scalar); the bootstrap is
a few lines here because it resamples *seeds within each size* (the unit of replication), which no library
call does."""
from __future__ import annotations

import math

import numpy as np


def summary(values) -> dict:
    """mean, std (n − 1), 95% t-interval and n of a list of numbers (None entries dropped)."""
    from scipy import stats

    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "std": None, "ci95": None, "n": 1}
    std = float(x.std(ddof=1))
    h = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    return {"mean": mean, "std": std, "ci95": [mean - h, mean + h], "n": n}


def paired(values: dict, base: dict) -> dict | None:
    """The difference `values − base` over the seeds both have ({seed: value}): mean, 95% t-interval and
    the two-sided paired t-test p-value (None with fewer than 2 pairs)."""
    from scipy import stats

    seeds = sorted(s for s in values if s in base and values[s] is not None and base[s] is not None)
    if not seeds:
        return None
    d = np.array([values[s] - base[s] for s in seeds], dtype=float)
    out = summary(d)
    out["seeds"] = seeds
    if len(d) < 2:
        out["p_value"] = None
    elif np.allclose(d, d[0]):  # no spread: the t statistic is undefined
        out["p_value"] = 1.0 if abs(d[0]) < 1e-12 else 0.0
    else:
        out["p_value"] = float(stats.ttest_rel([values[s] for s in seeds], [base[s] for s in seeds]).pvalue)
    return out


# ----------------------------------------------------------------------------- power law
def power_law(n, a, b, c):
    return a * np.power(n, -b) + c


def _ac_for(b: float, x: np.ndarray, err: np.ndarray, cmax: float) -> tuple[float, float, float]:
    """For a fixed exponent b the law is linear in (a, c): non-negative least squares, c capped at cmax;
    (a, c, sse)."""
    from scipy.optimize import nnls

    X = np.stack([np.power(x, -b), np.ones_like(x)], axis=1)
    (a, c), _ = nnls(X, err)
    if c > cmax:
        c = cmax
        z = X[:, 0]
        a = max(0.0, float(z @ (err - c) / max(z @ z, 1e-300)))
    r = a * X[:, 0] + c - err
    return float(a), float(c), float(r @ r)


def fit_power_law(n, err) -> tuple[float, float, float]:
    """Least-squares a·n^(−b) + c with a ≥ 0, 0 ≤ b ≤ 5, 0 ≤ c ≤ min(err). For a fixed b the law is linear
    in (a, c), so the fit is a 1-D search over b (a grid, then a bounded refinement around its best) with
    (a, c) solved exactly at each b — robust, and fast enough for a bootstrap of a thousand fits. Fitted in
    n / n_min (well-conditioned), returned for n itself."""
    from scipy.optimize import minimize_scalar

    n, err = np.asarray(n, dtype=float), np.asarray(err, dtype=float)
    if len(n) < 3 or not np.all(np.isfinite(err)) or not np.all(n > 0):
        raise ValueError("the power law needs at least 3 finite points at n > 0")
    n0 = float(n.min())
    x = n / n0
    cmax = max(float(err.min()), 0.0)
    grid = np.linspace(0.0, 5.0, 101)
    sse = [_ac_for(b, x, err, cmax)[2] for b in grid]
    k = int(np.argmin(sse))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    res = minimize_scalar(lambda b: _ac_for(b, x, err, cmax)[2], bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-6})
    b = float(res.x) if res.fun <= sse[k] else float(grid[k])
    a, c, _ = _ac_for(b, x, err, cmax)
    return a * n0 ** b, b, c


def r2(y, yhat) -> float:
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - yhat) ** 2).sum()) / ss if ss > 0 else float("nan")


def scaling(points: dict, boot: int = 1000, seed: int = 0, targets=(2.0, 10.0)) -> dict:
    """`points`: {n: [err per seed]} (n = training examples or tokens; err = lower is better). The fit on
    the per-size means, bootstrap CIs (seeds resampled within each size), R², a monotonicity check, the
    extrapolation error (fit without the largest size, predict it) and predictions at `targets` × the
    largest n."""
    sizes = sorted(points)
    if len(sizes) < 3:
        raise ValueError(f"a power-law fit needs at least 3 sizes, got {len(sizes)}")
    means = np.array([float(np.mean(points[n])) for n in sizes])
    ns = np.array(sizes, dtype=float)
    a, b, c = fit_power_law(ns, means)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(boot):
        m = [float(np.mean(rng.choice(points[n], size=len(points[n]), replace=True))) for n in sizes]
        try:
            draws.append(fit_power_law(ns, m))
        except ValueError:
            continue
    draws = np.array(draws)
    top = float(ns.max())

    def ci(col):
        return [float(np.percentile(col, 2.5)), float(np.percentile(col, 97.5))] if len(col) else None

    predicted = {}
    for t in targets:
        x = t * top
        predicted[f"{t:g}x"] = {"n": x, "value": float(power_law(x, a, b, c)),
                                "ci95": ci(power_law(x, draws[:, 0], draws[:, 1], draws[:, 2])) if len(draws) else None}
    extrap = None
    if len(sizes) >= 4:  # 3 parameters: fit on at least 3 smaller sizes
        try:
            pa, pb, pc = fit_power_law(ns[:-1], means[:-1])
            pred = float(power_law(top, pa, pb, pc))
            extrap = {"fit_on": [int(x) for x in sizes[:-1]], "n": int(top), "predicted": pred,
                      "measured": float(means[-1]), "error": pred - float(means[-1]),
                      "relative_error": (pred - float(means[-1])) / float(means[-1]) if means[-1] else None}
        except ValueError:
            extrap = None
    violations = [[int(sizes[i]), int(sizes[i + 1])] for i in range(len(sizes) - 1) if means[i + 1] > means[i]]
    return {"a": a, "b": b, "c": c, "a_ci95": ci(draws[:, 0]) if len(draws) else None,
            "b_ci95": ci(draws[:, 1]) if len(draws) else None, "c_ci95": ci(draws[:, 2]) if len(draws) else None,
            "r2": r2(means, power_law(ns, a, b, c)), "bootstrap": len(draws),
            "extrapolation_error": None if extrap is None else extrap["error"], "extrapolation": extrap,
            "monotone": not violations, "monotonicity_violations": violations, "predicted": predicted,
            "points": {str(int(n)): {"mean": float(m), "values": [float(v) for v in points[n]]}
                       for n, m in zip(sizes, means)}}


# ----------------------------------------------------------------------------- reading one curve off another
def equivalent_x(y: float, xs, ys) -> tuple[float | None, str]:
    """The x at which the curve (xs, ys) — means at increasing x — reaches the value y, by linear
    interpolation in log2(1 + x) between the first pair of neighbouring points that brackets y (Le Scao &
    Rush 2021 read "how many data points a prompt is worth" off two learning curves this way).
    Returns (x, "within") or (None, "below" / "above") when y is outside the curve's range."""
    pts = sorted(zip(map(float, xs), map(float, ys)))
    if not pts:
        return None, "below"
    if y < min(v for _, v in pts):
        return None, "below"
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if min(y0, y1) <= y <= max(y0, y1):
            if y1 == y0:
                return x0, "within"
            u0, u1 = math.log2(1 + x0), math.log2(1 + x1)
            u = u0 + (y - y0) / (y1 - y0) * (u1 - u0)
            return float(2 ** u - 1), "within"
    if len(pts) == 1 and y == pts[0][1]:
        return pts[0][0], "within"
    return None, "above"
