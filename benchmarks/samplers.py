"""Sampler accuracy on Gaussian data, where the optimal velocity and the exact ODE solution are
closed-form (tests/exact.py): convergence orders and steps to a fixed distribution error.

Data x0 ~ N(μ, Σ) in 3-D (μ = (1, −2, 0.5), Σ = A·Aᵀ/2 with A lower-triangular, correlated), the
network replaced by the exact velocity v*(x, t) = α'·E[x0 | x_t] + σ'·E[ε | x_t] of the path, float64,
time grid `flow_timesteps(steps, shift=1)`.

    python benchmarks/samplers.py [--threads 1]

Prints ``name: value`` lines:

- ``<sampler>_order``: least-squares slope of log(error) against log(steps) over steps = 128, 256,
  512, 1024 on the flow path (rectified flow, α = 1 − t, σ = t), where error is the RMS distance at
  t = 0 between the sampler's output and the exact ODE solution x(0) = μ + Σ^{1/2}·z from the same
  noise z (the infinitely fine reference, in closed form). Expected 1 for Euler and DDIM (η = 0),
  2 for Heun and UniPC; DPM-Solver++(2M) converges as log(N)/N² on a uniform-t grid (see
  modules/samplers/dpm_solver.py), so its slope approaches 2 from below.
  ``vp_<sampler>_order``: the same on the cosine VP path α = cos(πt/2), σ = sin(πt/2).
- ``<sampler>_steps_w2_1e-2`` / ``<sampler>_nfe_w2_1e-2``: the fewest steps (and the velocity
  evaluations they cost) for which the law of the output is within 2-Wasserstein distance 1e-2 of
  N(μ, Σ), on the flow path (W2 between Gaussians in closed form). With Gaussian data every
  sampler is affine in its starting noise and its step noise, so its output law is Gaussian and is
  read exactly, without Monte Carlo: from d + 1 noise points for the deterministic samplers, and for
  the stochastic ones (DDIM η = 0.5 and 1, DDPM) also from one row per (step, coordinate) of unit step noise
  (`w2_stochastic`).
"""

from __future__ import annotations

import argparse
import math
import sys
from unittest import mock
from pathlib import Path as FilePath

import numpy as np
import torch

sys.path.insert(0, str(FilePath(__file__).resolve().parents[1] / "tests"))

from exact import GaussianMixture, gaussian_w2, whitened_normal  # noqa: E402

from modules.objectives.paths import LinearPath  # noqa: E402
from modules.samplers.ddim import DDIMSampler  # noqa: E402
from modules.samplers.ddpm import DDPMSampler  # noqa: E402
from modules.samplers.dpm_solver import DPMSolverPlusPlus2MSampler  # noqa: E402
from modules.samplers.euler import EulerSampler  # noqa: E402
from modules.samplers.heun import HeunSampler  # noqa: E402
from modules.samplers.unipc import UniPCSampler  # noqa: E402

A = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]], dtype=torch.float64)
DATA = GaussianMixture.gaussian([1.0, -2.0, 0.5], A @ A.T / 2)
TARGET_W2 = 1e-2
ORDER_STEPS = [128, 256, 512, 1024]

DETERMINISTIC = {
    "euler": EulerSampler,
    "ddim": lambda steps: DDIMSampler(steps, eta=0.0),
    "heun": HeunSampler,
    "dpmpp2m": DPMSolverPlusPlus2MSampler,
    "unipc": UniPCSampler,
}
STOCHASTIC = {
    "ddim_eta0.5": lambda steps: DDIMSampler(steps, eta=0.5, seed=0),
    "ddim_eta1": lambda steps: DDIMSampler(steps, eta=1.0, seed=0),
    "ddpm": lambda steps: DDPMSampler(steps, seed=0),
}


class CosineVPPath:
    """α = cos(πt/2), σ = sin(πt/2) (Nichol & Dhariwal 2021's cosine schedule without offset)."""

    def alpha_sigma(self, t):
        return torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)

    def derivatives(self, t):
        return -math.pi / 2 * torch.sin(math.pi / 2 * t), math.pi / 2 * torch.cos(math.pi / 2 * t)


def order(make, path, z: torch.Tensor) -> float:
    v, ref = DATA.velocity(path), DATA.flow_map(path, z)
    errors = [(make(n).sample(v, z, path=path) - ref).pow(2).sum(1).mean().sqrt().item() for n in ORDER_STEPS]
    return -float(np.polyfit(np.log(ORDER_STEPS), np.log(errors), 1)[0])


def w2_deterministic(make, steps: int, path) -> float:
    """Exact W2 of an affine sampler's output law: b = F(0), A e_i = F(e_i) − b."""
    d = DATA.dim
    points = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)])  # (d + 1, d)
    out = make(steps).sample(DATA.velocity(path), points, path=path)
    b, a = out[0], (out[1:] - out[0]).T  # (d,), (d, d) columns A e_i
    end = DATA.marginal(path, 0.0)
    return gaussian_w2(b, a @ a.T, end.means[0], end.covs[0])


def w2_stochastic(make, steps: int, path) -> float:
    """Exact W2 of a stochastic sampler's output law. With Gaussian data every step is affine in the
    state and in its noise draw, x_N = A·z + b + Σ_j B_j·ζ_j, so the law is N(b, A·Aᵀ + Σ_j B_j·B_jᵀ).
    One batched run reads all of it: row 0 has z = 0 and no step noise (-> b), rows 1..d have z = e_i
    (-> A), and row (j, i) has z = 0 and step noise e_i at the j-th noisy step only (-> B_j e_i); the
    sampler's `step_noise` is swapped for that table (the samplers' maths is untouched)."""
    d = DATA.dim
    sampler = make(steps)
    eye = torch.eye(d, dtype=torch.float64)
    rows = 1 + d + steps * d
    points = torch.zeros(rows, d, dtype=torch.float64)
    points[1 : 1 + d] = eye
    calls = []

    def table_noise(like, generator):
        j = len(calls)
        calls.append(j)
        z = torch.zeros_like(like)
        z[1 + d + j * d : 1 + d + (j + 1) * d] = eye
        return z

    with mock.patch.object(sys.modules[type(sampler).__module__], "step_noise", table_noise):
        out = sampler.sample(DATA.velocity(path), points, path=path)
    b, a = out[0], (out[1 : 1 + d] - out[0]).T  # (d,), (d, d)
    noise_cols = (out[1 + d :] - out[0]).T  # (d, steps·d): B_j e_i, zero for unused rows
    cov = a @ a.T + noise_cols @ noise_cols.T
    end = DATA.marginal(path, 0.0)
    return gaussian_w2(b, cov, end.means[0], end.covs[0])


def fewest_steps(w2_of, limit: int = 4096) -> int:
    """Smallest steps with w2_of(steps) < TARGET_W2: doubling, then bisection (error ~ monotone)."""
    hi = 1
    while w2_of(hi) >= TARGET_W2:
        hi *= 2
        if hi > limit:
            return -1
    lo = hi // 2  # fails (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if w2_of(mid) < TARGET_W2 else (mid, hi)
    return hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    flow, vp = LinearPath(), CosineVPPath()
    z = whitened_normal(256, DATA.dim, torch.Generator().manual_seed(0))
    for name, make in DETERMINISTIC.items():
        print(f"{name}_order: {order(make, flow, z):.3f}", flush=True)
    for name, make in DETERMINISTIC.items():
        print(f"vp_{name}_order: {order(make, vp, z):.3f}", flush=True)

    for name, make in DETERMINISTIC.items():
        steps = fewest_steps(lambda n: w2_deterministic(make, n, flow))
        print(f"{name}_steps_w2_1e-2: {steps}", flush=True)
        print(f"{name}_nfe_w2_1e-2: {make(steps).nfe}", flush=True)
    for name, make in STOCHASTIC.items():
        steps = fewest_steps(lambda n: w2_stochastic(make, n, flow))
        print(f"{name}_steps_w2_1e-2: {steps}", flush=True)
        print(f"{name}_nfe_w2_1e-2: {make(steps).nfe}", flush=True)

if __name__ == "__main__":
    main()
