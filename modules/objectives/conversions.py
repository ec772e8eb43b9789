"""What a denoising network predicts, and how the three usual targets turn into one another.

On any path x_t = α·x0 + σ·ε (modules/objectives/paths.py) a prediction of one of

    "eps"  ε                     (Ho et al. 2020),
    "x0"   x0                    (the clean sample),
    "v"    v = α·ε − σ·x0        (Salimans & Ho 2022 §4, "v-prediction"),

together with x_t fixes the other two, because (x_t, prediction) is an invertible linear image of
(x0, ε). For "v" the 2×2 system [[α, σ], [−σ, α]] has determinant α² + σ², so

    x0 = (α·x_t − σ·v) / (α² + σ²),     ε = (σ·x_t + α·v) / (α² + σ²),

which on a variance-preserving path (α² + σ² = 1) is Salimans & Ho's x0 = α·x_t − σ·v.

Careful: this v is not the probability-flow velocity dx_t/dt = α'·x0 + σ'·ε that samplers integrate
(that one needs the path's derivatives: `paths.velocity_from_predictions`). Writing α = cos φ,
σ = sin φ on a VP path, Salimans' v is dx/dφ, the velocity in the angle φ, not in t.

Singular points: "eps" gives no x0 where α = 0 (t = 1 with zero terminal SNR, Lin et al. 2024 §3.2),
"x0" gives no ε where σ = 0 (t = 0); "v" is defined wherever α² + σ² > 0.

α and σ are tensors broadcastable against x_t (see `paths.expand_like`).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

ToX0Eps = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
FromX0Eps = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def x0_eps_from_eps(eps: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, ε) from ε: x0 = (x_t − σ·ε) / α."""
    return (x_t - sigma * eps) / alpha, eps


def x0_eps_from_x0(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, ε) from x0: ε = (x_t − α·x0) / σ."""
    return x0, (x_t - alpha * x0) / sigma


def x0_eps_from_v(v: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, ε) from v = α·ε − σ·x0 by inverting [[α, σ], [−σ, α]] (module docstring)."""
    norm = alpha * alpha + sigma * sigma
    return (alpha * x_t - sigma * v) / norm, (sigma * x_t + alpha * v) / norm


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = α·ε − σ·x0 (Salimans & Ho 2022 eq. in §4)."""
    return alpha * eps - sigma * x0


def _eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return eps


def _x0(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return x0


# prediction name -> (its reading as (x0, ε), the prediction made from (x0, ε))
PREDICTIONS: dict[str, tuple[ToX0Eps, FromX0Eps]] = {
    "eps": (x0_eps_from_eps, _eps),
    "v": (x0_eps_from_v, v_from_x0_eps),
    "x0": (x0_eps_from_x0, _x0),
}


def check_prediction(prediction: str) -> str:
    """Return ``prediction`` when it is a known name; raise ValueError listing the valid ones."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
    return prediction


def to_x0_eps(prediction: str, output: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Read a network ``output`` of kind ``prediction`` ("eps", "v", "x0") at x_t as (x0, ε)."""
    return PREDICTIONS[check_prediction(prediction)][0](output, x_t, alpha, sigma)


def from_x0_eps(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The ``prediction`` ("eps", "v", "x0") that (x0, ε) correspond to: the regression target."""
    return PREDICTIONS[check_prediction(prediction)][1](x0, eps, alpha, sigma)
