"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the
preserved knowledge's keys, so that edits leave what the model knew (and earlier edits) alone.

Per edited layer, with K the new facts' keys ``[d, n]``, R their residuals ``[n, out]`` (as
MEMIT computes them, layer by layer), C_p = Σ K_p K_pᵀ over the keys of the edits made before in
the same stream, and P the projector onto the eigenvectors of the preserved keys' second moment
C = E[k kᵀ] whose eigenvalues are below ``nullspace_threshold`` times the largest:

    X = (P (K Kᵀ + C_p) + λ I)⁻¹ P K R,      ΔW = Xᵀ.

X lies in P's range ((λ I + P A) X = P b gives X = P (b − A X) / λ), so ΔW k₀ = Xᵀ P k₀ ≈ 0 for
a preserved key k₀: the outputs the statistics describe do not move. After each write, K Kᵀ is
added to C_p, so a later edit also keeps the earlier edits' keys; the sum is emptied when an
edit stream ends (:meth:`AlphaEdit.end_stream`) and is never used by an independent edit.

P is computed once per layer from the cached statistics (one d × d eigendecomposition in
float64) and cached beside them (``<stats>.nullspace-<threshold>.pt``).

**Ours**: the threshold is relative to the largest eigenvalue (the reference's 2·10⁻² is
absolute, for GPT-J's statistics); the layers, the target states and the post-norm mapping are
this project's MEMIT (:mod:`remedi.methods.memit`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from remedi.atomic import atomic_path
from remedi.data import EditCase
from remedi.methods.memit import Memit, MemitHyperParams, apply_edits
from remedi.methods.second_moment import UNREADABLE, SecondMoment, float64_device
from remedi.methods.weights import EditHandle
from remedi.models import LoadedModel
from remedi.registry import register

log = logging.getLogger(__name__)


@dataclass
class AlphaEditHyperParams(MemitHyperParams):
    """MEMIT's settings plus the null space's threshold and the update's ridge λ."""

    nullspace_threshold: float = 1e-2
    """Eigenvectors of C whose eigenvalue is below this times the largest span the null space."""
    l2: float = 10.0
    """λ of ``(P (K Kᵀ + C_p) + λ I)⁻¹`` (the reference's ``L2``)."""


_PROJECTORS: dict[tuple[str, float], torch.Tensor] = {}


def null_space_projector(matrix: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U Uᵀ (float64) over the eigenvectors U of the symmetric ``matrix`` whose
    eigenvalues are below ``threshold`` times its largest."""
    if not 0 < threshold < 1:
        raise ValueError(f"nullspace_threshold must be in (0, 1), got {threshold}")
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    kept = vectors[:, values < threshold * values.max()]
    return kept @ kept.T


def projector(stats: SecondMoment | torch.Tensor, threshold: float) -> torch.Tensor:
    """The layer's P, from the file cached beside its statistics when there is one."""
    matrix = stats.matrix if isinstance(stats, SecondMoment) else stats
    path = stats.path if isinstance(stats, SecondMoment) else None
    key = (str(path) if path is not None else f"id{id(matrix)}", threshold)
    if key in _PROJECTORS:
        return _PROJECTORS[key]
    cached = None if path is None else path.with_name(f"{path.stem}.nullspace-{threshold:g}.pt")
    result = None
    if cached is not None and cached.is_file():
        try:
            data = torch.load(cached, map_location="cpu", weights_only=True)
            if isinstance(stats, SecondMoment) and int(data["n_tokens"]) == stats.n_tokens:
                result = data["projector"]
        except UNREADABLE as err:
            log.warning("cached projector %s is unusable (%s); computing it again", cached, err)
    if result is None:
        result = null_space_projector(matrix, threshold)
        if cached is not None:
            assert isinstance(stats, SecondMoment)
            with atomic_path(cached) as tmp:
                torch.save({"projector": result, "n_tokens": stats.n_tokens}, tmp)
    _PROJECTORS[key] = result
    return result


def projected_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projection: torch.Tensor,
    accumulated: torch.Tensor | None,
    l2: float,
) -> torch.Tensor:
    """ΔW ``[out, d]`` = Xᵀ, X = (P (K Kᵀ + C_p) + λ I)⁻¹ P K R for keys ``[n, d]`` and
    residuals ``[n, out]`` (float64 on P's device; C_p = ``accumulated``, None: no earlier
    edits)."""
    device = projection.device
    k = keys.to(device, torch.float64).T  # [d, n]
    r = residuals.to(device, torch.float64)  # [n, out]
    gram = k @ k.T
    if accumulated is not None:
        gram = gram + accumulated.to(device, torch.float64)
    system = projection @ gram
    system.diagonal().add_(l2)
    return torch.linalg.solve(system, projection @ (k @ r)).T


@register
class AlphaEdit(Memit):
    """AlphaEdit: MEMIT's updates in the null space of the preserved and the earlier edits'
    keys (MEMIT's layers and batching, its own solve)."""

    name = "alphaedit"
    order = 7
    summary = "AlphaEdit: MEMIT projected onto the preserved keys' null space (Fang et al. 2025)"
    Settings = AlphaEditHyperParams
    requires_statistics = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.streaming = False
        self.accumulated: dict[int, torch.Tensor] = {}

    def begin_stream(self, lm: LoadedModel) -> None:
        """Edits from now on accumulate their keys (a sequential or batched stream)."""
        self.streaming = True
        self.accumulated = {}

    def end_stream(self, lm: LoadedModel) -> None:
        """The stream is over: the accumulated keys are dropped."""
        self.streaming = False
        self.accumulated = {}

    def write(self, lm: LoadedModel, cases: Sequence[EditCase]) -> list[EditHandle]:
        hp = self.resolve(lm)
        assert isinstance(hp, AlphaEditHyperParams)
        assert hp.layers is not None
        stats = self.environment.statistics.of(lm, list(hp.layers))
        if stats is None:
            raise ValueError("alphaedit needs second-moment statistics (do not pass --no-stats)")
        device = float64_device(lm.device)
        projections = {
            layer: projector(stats[layer], hp.nullspace_threshold).to(device) for layer in hp.layers
        }
        written: dict[int, torch.Tensor] = {}

        def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
            earlier = self.accumulated.get(layer) if self.streaming else None
            written[layer] = keys
            return projected_update(keys, residuals, projections[layer], earlier, hp.l2)

        handle = apply_edits(
            lm,
            cases,
            stats=stats,
            hparams=hp,
            progress=self.environment.progress,
            solver=solve,
            method=self.name,
        )
        if self.streaming:
            for layer, keys in written.items():
                k = keys.to(device, torch.float64)
                self.accumulated[layer] = self.accumulated.get(layer, 0) + k.T @ k
        handle.info.update(
            nullspace_dims={layer: round(float(p.trace())) for layer, p in projections.items()},
            accumulated_edits=self.streaming,
        )
        return [handle]
