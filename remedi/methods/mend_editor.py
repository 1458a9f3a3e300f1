"""``mend``: a trained MEND gradient editor (Mitchell et al. 2021). Each request's update is
computed by the trained network from the fine-tuning gradient and written into the MLP output
projections; the network is trained by ``lightning_modules.gradient_editor.MendModule``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from remedi.checkpoints import TrainedCheckpoint
from remedi.data import EditCase
from remedi.editors import MendEditor
from remedi.editors.gradient import GradientEditor
from remedi.models import LoadedModel
from remedi.registry import TrainedMethod, WeightMethod, register


class GradientEditing(TrainedMethod, WeightMethod):
    """Shared application of the gradient editors (MEND, KE): every request of one edit in
    one summed update."""

    def write(self, lm: LoadedModel, cases: Sequence[EditCase]) -> list[Any]:
        self.bind(lm)
        editor: GradientEditor = self.loaded
        return [editor.apply_edit(lm, list(cases))]

    @staticmethod
    def projection_shape(lm: LoadedModel, found: TrainedCheckpoint) -> tuple[int, int]:
        """``(in, out)`` widths of the edited MLP output projections."""
        return lm.arch.mlp_out_shape(found.layers[0])


@register
class Mend(GradientEditing):
    """A trained MEND editor."""

    name = "mend"
    order = 9
    summary = "trained MEND gradient editor (needs a checkpoint)"
    lightning_module = "lightning_modules.gradient_editor:MendModule"

    def build(self, lm: LoadedModel, found: TrainedCheckpoint) -> MendEditor:
        n_in, n_out = self.projection_shape(lm, found)
        rank = int(found.hparams.get("rank", 256))
        positions = found.hparams.get("positions", "all")
        return MendEditor(found.layers, n_in, n_out, rank=rank, positions=positions)
