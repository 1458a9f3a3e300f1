"""``ke``: a trained KnowledgeEditor (De Cao et al. 2021), applied like MEND (see
:mod:`remedi.methods.mend_editor`); trained by ``lightning_modules.gradient_editor.KeModule``."""

from __future__ import annotations

from remedi.checkpoints import TrainedCheckpoint
from remedi.editors import KeEditor
from remedi.methods.mend_editor import GradientEditing
from remedi.models import LoadedModel
from remedi.registry import register


@register
class Ke(GradientEditing):
    """A trained KnowledgeEditor."""

    name = "ke"
    order = 10
    summary = "trained KnowledgeEditor hyper-network (needs a checkpoint)"
    lightning_module = "lightning_modules.gradient_editor:KeModule"

    def build(self, lm: LoadedModel, found: TrainedCheckpoint) -> KeEditor:
        n_in, n_out = self.projection_shape(lm, found)
        hidden = int(found.hparams.get("hidden", 128))
        positions = found.hparams.get("positions", "all")
        return KeEditor(
            found.layers, n_in, n_out, lm.arch.hidden_size, hidden=hidden, positions=positions
        )
