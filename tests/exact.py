"""Closed-form optimal denoisers and velocities for Gaussian and Gaussian-mixture data, on any
noising path x_t = α(t)·x0 + σ(t)·ε (t = 0 data, t = 1 noise, ε ~ N(0, I)); and the distances the
sampler tests and benchmarks compare distributions with.

Data p(x0) = Σ_k w_k·N(μ_k, Σ_k) on R^d. Given the component k, (x0, ε, x_t) are jointly Gaussian
with x_t | k ~ N(α·μ_k, C_k), C_k(t) = α²·Σ_k + σ²·I, Cov(x0, x_t | k) = α·Σ_k, Cov(ε, x_t | k) = σ·I,
so Gaussian conditioning (Bishop 2006, §2.3.1) gives

    E[x0 | x_t, k] = μ_k + α·Σ_k·C_k⁻¹·(x_t − α·μ_k),      E[ε | x_t, k] = σ·C_k⁻¹·(x_t − α·μ_k),

and over the posterior responsibilities r_k(x_t) = w_k·N(x_t; α·μ_k, C_k) / Σ_j w_j·N(x_t; α·μ_j, C_j)

    E[x0 | x_t] = Σ_k r_k·E[x0 | x_t, k]       (likewise ε),
    v*(x_t, t)  = α'(t)·E[x0 | x_t] + σ'(t)·E[ε | x_t],

the minimiser of the flow-matching (velocity) regression on that path: the network an objective
would have after perfect training. C_k is diagonalised once, Σ_k = U_k·diag(l_k)·U_kᵀ, so that
C_k = U_k·diag(α²·l_k + σ²)·U_kᵀ at every t.

One Gaussian (K = 1): C(t) commutes with Σ, and x_t = α(t)·μ + C(t)^{1/2}·z solves dx/dt = v*
(d/dt C^{1/2} = ½·C'·C^{−1/2} = (α'α·Σ + σ'σ)·C^{−1/2}), so the exact ODE sends noise z at t = 1
(α = 0, σ = 1) to α(0)·μ + C(0)^{1/2}·z at t = 0 (`GaussianMixture.flow_map`); the marginal at t = 0
is N(α(0)·μ, C(0)), the data itself when σ(0) = 0.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

Tensorish = Tensor | Sequence


def _sqrtm(c: Tensor) -> Tensor:
    """Symmetric PSD square root (d, d) by eigendecomposition."""
    l, u = torch.linalg.eigh(c)
    return u @ torch.diag(l.clamp_min(0).sqrt()) @ u.T


class GaussianMixture:
    """Σ_k w_k·N(μ_k, Σ_k) on R^d, float64. weights (K,), means (K, d), covs (K, d, d) SPD."""

    def __init__(self, weights: Tensorish, means: Tensorish, covs: Tensorish) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, d)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)  # (K, d, d)
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)  # (K, d), (K, d, d)
        if (self.eigvals <= 0).any():
            raise ValueError("component covariances must be positive definite")

    @classmethod
    def gaussian(cls, mean: Tensorish, cov: Tensorish) -> "GaussianMixture":
        mean = torch.as_tensor(mean, dtype=torch.float64)
        return cls([1.0], mean[None], torch.as_tensor(cov, dtype=torch.float64)[None])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        """E[x0], (d,)."""
        return self.weights @ self.means

    def cov(self) -> Tensor:
        """Cov[x0] = Σ_k w_k(Σ_k + μ_kμ_kᵀ) − mmᵀ, (d, d)."""
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        m = self.mean()
        return second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """(n, d) float64 draws."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covs)  # (K, d, d)
        return self.means[k] + torch.einsum("nij,nj->ni", chol[k], z)

    def _components(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per component: E[x0 | x_t, k], E[ε | x_t, k] (K, n, d) and log w_k N(x_t; αμ_k, C_k) (K, n)."""
        a, s = alpha[None, :, None], sigma[None, :, None]  # (1, n, 1)
        y = torch.einsum("kji,nj->kni", self.eigvecs, x) - a * torch.einsum("kji,kj->ki", self.eigvecs, self.means)[:, None]
        c = a**2 * self.eigvals[:, None, :] + s**2  # (K, n, d) eigenvalues of C_k
        x0 = self.means[:, None, :] + torch.einsum("kij,knj->kni", self.eigvecs, a * self.eigvals[:, None, :] * y / c)
        eps = torch.einsum("kij,knj->kni", self.eigvecs, s * y / c)
        logp = self.weights.log()[:, None] - 0.5 * (y**2 / c + c.log()).sum(-1)  # (K, n), up to a constant
        return x0, eps, logp

    def posterior_means(self, path, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(E[x0 | x_t = x], E[ε | x_t = x]) for x (n, d), t (n,) on ``path`` (α, σ)."""
        alpha, sigma = path.alpha_sigma(t.to(torch.float64))
        x0, eps, logp = self._components(x.to(torch.float64), alpha, sigma)
        r = torch.softmax(logp, dim=0)[:, :, None]  # (K, n, 1) responsibilities
        return (r * x0).sum(0), (r * eps).sum(0)

    def velocity(self, path) -> Callable[[Tensor, Tensor], Tensor]:
        """v*(x (n, d), t (n,)) -> (n, d) in x's dtype: the exact velocity on ``path``."""

        def v(x: Tensor, t: Tensor) -> Tensor:
            x0, eps = self.posterior_means(path, x, t)
            d_alpha, d_sigma = path.derivatives(t.to(torch.float64))
            return (d_alpha[:, None] * x0 + d_sigma[:, None] * eps).to(x.dtype)

        return v

    def responsibilities(self, x: Tensor) -> Tensor:
        """(n, K) posterior component probabilities of data points x (n, d) (t = 0)."""
        zero = torch.zeros(x.shape[0], dtype=torch.float64)
        return torch.softmax(self._components(x.to(torch.float64), zero + 1, zero)[2], dim=0).T

    def marginal(self, path, t: float) -> "GaussianMixture":
        """The law of x_t: components N(α·μ_k, α²·Σ_k + σ²·I)."""
        alpha, sigma = (float(v) for v in path.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, alpha * self.means, alpha**2 * self.covs + sigma**2 * eye)

    def flow_map(self, path, z: Tensor) -> Tensor:
        """Exact ODE solution at t = 0 from noise z (n, d) at t = 1 (one Gaussian only)."""
        if len(self.weights) != 1:
            raise ValueError("the closed-form flow map is for one Gaussian")
        end = self.marginal(path, 0.0)
        return end.means[0] + z.to(torch.float64) @ _sqrtm(end.covs[0]).T


def gaussian_w2(m1: Tensor, c1: Tensor, m2: Tensor, c2: Tensor) -> float:
    """2-Wasserstein distance between N(m1, c1) and N(m2, c2) (Dowson & Landau 1982; Givens & Shortt
    1984): W2² = |m1 − m2|² + tr(c1 + c2 − 2·(c2^{1/2}·c1·c2^{1/2})^{1/2})."""
    r = _sqrtm(c2)
    bures = torch.trace(c1 + c2 - 2 * _sqrtm(r @ c1 @ r)).clamp_min(0)
    return math.sqrt(float((m1 - m2).pow(2).sum() + bures))


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sample mean (d,) and covariance (d, d) (normalised by n) of x (n, d), float64."""
    x = x.to(torch.float64)
    m = x.mean(0)
    return m, (x - m).T @ (x - m) / x.shape[0]


def whitened_normal(n: int, d: int, generator: torch.Generator) -> Tensor:
    """(n, d) float64 normal draws shifted and rotated so that `moments` gives exactly 0 and I:
    any affine map of them then has exactly the moments of the map applied to N(0, I)."""
    z = torch.randn(n, d, generator=generator, dtype=torch.float64)
    m, c = moments(z)
    return torch.linalg.solve_triangular(torch.linalg.cholesky(c), (z - m).T, upper=False).T


def mmd2(x: Tensor, y: Tensor, bandwidth: float) -> float:
    """Unbiased squared maximum mean discrepancy (Gretton et al. 2012, eq. 3) with the Gaussian kernel
    exp(−|a − b|² / (2·bandwidth²)) between samples x (n, d) and y (m, d); 0 in expectation when
    both come from the same law. Kernel values in float32 (5x faster on CPU), sums in float64."""

    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2)).to(torch.float64)

    x, y = x.to(torch.float32), y.to(torch.float32)
    n, m = x.shape[0], y.shape[0]
    kxx = (k(x, x).sum() - n) / (n * (n - 1))
    kyy = (k(y, y).sum() - m) / (m * (m - 1))
    return float(kxx + kyy - 2 * k(x, y).mean())
