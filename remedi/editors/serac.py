"""SERAC (Mitchell et al. 2022): edits kept in a memory instead of the weights.

A scope classifier decides, for each input, whether it is about one of the remembered edits;
if it is, a *counterfactual model* answers the input with that edit's statement read before it;
otherwise the untouched LM answers. Here both parts live on the frozen LM:

- the classifier embeds the LM's hidden states at block ``scope_layer`` through a small
  trained head: each remembered edit is keyed by its subject's last token in its rewrite prompt
  (ROME's key), and an input's score against every edit is its best-matching token's cosine,
  one product of the input's token embeddings with the memory's keys; ``p = σ(scale · cos +
  bias)``, in scope when the best edit's ``p`` exceeds :data:`THRESHOLD`;
- the counterfactual model is the same LM with a LoRA adapter (``peft``'s layers on the MLP
  output projections of ``adapter_layers``) reading ``statement + ".\\n"`` before the input's
  own tokens. The adapter is put into the LM only for the counterfactual passes
  (:meth:`SeracEditor.counterfactual`) and taken out after them, so every other pass runs the
  LM's own modules.

Scored rows are routed by their prompt (:func:`routed_edit`): the states that predict an
in-scope row's target tokens are replaced by the counterfactual model's, and out-of-scope rows
are left exactly as the LM computes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from remedi.data import EditCase
from remedi.hooks import Site, intervene
from remedi.metrics.rows import EditContext, ScoredRow
from remedi.models import LoadedModel
from remedi.tokens import ContinuationBatch, encode_prompts, encode_texts, pad_right

THRESHOLD = 0.5
"""An input is in an edit's scope when the classifier's probability exceeds this."""
SEPARATOR = ".\n"
"""Between an edit's statement and the input the counterfactual model reads."""
ADAPTER_NAME = "serac"


def context_text(case: EditCase) -> str:
    """What the counterfactual model reads before an input under ``case``'s edit."""
    return f"{case.edit_statement}{SEPARATOR}"


@dataclass
class TokenStates:
    """A batch of texts' states at one block: ``states`` ``[n, seq, hidden]`` and ``mask``
    ``[n, seq]``, True at the tokens a query is matched on (every token but the first, whose
    state is an attention sink in most LMs, and the padding)."""

    states: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> TokenStates:
        return TokenStates(self.states.to(device), self.mask.to(device))


def block_states(
    lm: LoadedModel, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The output of block ``layer`` for right-padded rows (the later blocks are not run)."""
    site = Site("block", layer)
    device = lm.device
    with torch.no_grad(), intervene(lm.arch, record=[site], stop_after=site) as states:
        lm.model.base_model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            use_cache=False,
        )
    return states[site].float()


def query_mask(lengths: torch.Tensor, seq: int) -> torch.Tensor:
    """``[n, seq]``: True at tokens ``1 .. lengths[i]-1`` (token 0 when a text has only one)."""
    steps = torch.arange(seq, device=lengths.device)[None, :]
    mask = (steps >= 1) & (steps < lengths[:, None])
    return mask | ((steps == 0) & (lengths[:, None] == 1))


def query_states(lm: LoadedModel, layer: int, texts: Sequence[str]) -> TokenStates:
    """Every token's state of ``texts`` at block ``layer``, as queries."""
    ids, mask, lengths = encode_texts(lm.tokenizer, texts)
    states = block_states(lm, layer, ids, mask)
    return TokenStates(states, query_mask(lengths.to(states.device), states.shape[1]))


def key_states(lm: LoadedModel, layer: int, cases: Sequence[EditCase]) -> torch.Tensor:
    """``[n, hidden]``: each edit's key, the state of its subject's last token in its rewrite
    prompt at block ``layer`` (what the LM knows of the subject there: ROME's key)."""
    if not cases:
        return torch.zeros(0, lm.arch.hidden_size)
    batch = encode_prompts(
        lm.tokenizer,
        [c.rewrite_prompt for c in cases],
        [c.subject for c in cases],
        subject_starts=[c.subject_start for c in cases],
    )
    states = block_states(lm, layer, batch.input_ids, batch.attention_mask)
    index = torch.arange(len(cases), device=states.device)
    return states[index, batch.subject_last.to(states.device)]


class ScopeClassifier(nn.Module):
    """The trained head of the scope classifier: a state → a unit embedding. The logit of
    "``x`` is about edit ``e``" is ``scale · max_t cos(x_t, e) + bias``, the best match of the
    edit's key among the query's tokens: an input is in scope when one of its tokens stands
    for the edited subject."""

    def __init__(self, hidden: int, width: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.proj = nn.Linear(hidden, width)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-5.0))

    def embed(self, states: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``[..., width]`` of states ``[..., hidden]``."""
        projected = self.proj(self.norm(states.to(self.proj.weight.dtype)))
        return nn.functional.normalize(projected, dim=-1)

    def logits(self, queries: TokenStates, keys: torch.Tensor) -> torch.Tensor:
        """``[n, m]`` scope logits of queries against embedded keys ``[m, width]``."""
        tokens = self.embed(queries.states)
        similarity = torch.einsum("ntw,mw->nmt", tokens, keys)
        similarity = similarity.masked_fill(~queries.mask[:, None, :], -2.0)
        return self.log_scale.exp() * similarity.amax(dim=-1) + self.bias


@dataclass
class Memory:
    """Remembered edits and their embedded keys (computed with the classifier as it is)."""

    cases: list[EditCase]
    keys: torch.Tensor

    def __len__(self) -> int:
        return len(self.cases)


@dataclass
class Routing:
    """Per query: the best edit's index in the memory, its probability, and whether the
    query goes to the counterfactual model."""

    edit: torch.Tensor
    probability: torch.Tensor
    in_scope: torch.Tensor


class SeracEditor(nn.Module):
    """The trainable parts of SERAC: the scope classifier's head and the LoRA factors of the
    counterfactual model (on the MLP output projections of ``adapter_layers``).

    Args:
        adapter_layers: blocks whose MLP output projection carries the adapter.
        n_in, n_out: the projections' input and output widths.
        hidden: the LM's hidden size (the classifier reads its states).
        scope_layer: the block whose output the classifier reads.
        rank, alpha: LoRA rank and scaling numerator (the update is ``alpha / rank · B A``).
        width: the classifier's embedding width.
    """

    def __init__(
        self,
        adapter_layers: Sequence[int],
        n_in: int,
        n_out: int,
        hidden: int,
        scope_layer: int,
        rank: int = 8,
        alpha: float = 16.0,
        width: int = 256,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.adapter_layers = list(adapter_layers)
        self.scope_layer = scope_layer
        self.rank, self.alpha = rank, alpha
        self.scope = ScopeClassifier(hidden, width)
        self.lora_A = nn.ModuleDict(
            {str(layer): nn.Linear(n_in, rank, bias=False) for layer in self.adapter_layers}
        )
        self.lora_B = nn.ModuleDict(
            {str(layer): nn.Linear(rank, n_out, bias=False) for layer in self.adapter_layers}
        )
        for module in self.lora_A.values():
            nn.init.kaiming_uniform_(cast(nn.Linear, module).weight, a=math.sqrt(5))
        for module in self.lora_B.values():
            nn.init.zeros_(cast(nn.Linear, module).weight)  # the adapter starts as the identity

    # -- the classifier -------------------------------------------------------------------------
    def memory(self, lm: LoadedModel, cases: Sequence[EditCase], batch_size: int = 32) -> Memory:
        """A memory of ``cases`` with keys embedded by the classifier as it is now."""
        keys = [
            key_states(lm, self.scope_layer, cases[start : start + batch_size])
            for start in range(0, len(cases), batch_size)
        ]
        found = torch.cat(keys) if keys else torch.zeros(0, lm.arch.hidden_size)
        return Memory(list(cases), self.scope.embed(found.to(lm.device)))

    def route(
        self, queries: TokenStates, memory: Memory, allowed: torch.Tensor | None = None
    ) -> Routing:
        """Route ``queries`` against ``memory``; ``allowed`` (``[n]`` memory indices) restricts
        query ``i`` to edit ``allowed[i]`` (each case on its own edit)."""
        if len(memory) == 0:
            n = queries.states.shape[0]
            device = queries.states.device
            empty = torch.zeros(n, dtype=torch.long, device=device)
            return Routing(empty, torch.zeros(n, device=device), empty.bool())
        logits = self.scope.logits(queries, memory.keys)
        if allowed is not None:
            best = allowed.to(logits.device)
            chosen = logits.gather(1, best[:, None])[:, 0]
        else:
            chosen, best = logits.max(dim=1)
        probability = torch.sigmoid(chosen)
        return Routing(best, probability, probability > THRESHOLD)

    # -- the counterfactual model ---------------------------------------------------------------
    @contextmanager
    def counterfactual(self, lm: LoadedModel) -> Iterator[None]:
        """Inside, ``lm`` runs as the counterfactual model: ``peft``'s LoRA layers wrap the
        adapted projections, with this editor's factors; on exit the LM's own modules are put
        back (its weights were never touched)."""
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        paths = {lm.arch.path("mlp_out", layer): layer for layer in self.adapter_layers}
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft takes a float too
            target_modules=list(paths),
            lora_dropout=0.0,
            fan_in_fan_out=lm.arch.mlp_out_orientation != "out_in",
        )
        model = lm.model
        had_config = "peft_config" in vars(model)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
        try:
            for name, layer in wrapped:
                key = str(paths[name])
                layer.lora_A[ADAPTER_NAME] = self.lora_A[key]
                layer.lora_B[ADAPTER_NAME] = self.lora_B[key]
            yield
        finally:
            for name, layer in wrapped:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer.get_base_layer())
            if not had_config:
                vars(model).pop("peft_config", None)


def default_scope_layer(lm: LoadedModel) -> int:
    """The block the classifier reads when none is given: a third of the way up."""
    return max(0, lm.arch.num_layers // 3 - 1)


def build_editor(lm: LoadedModel, hparams: dict[str, Any], layers: Sequence[int]) -> SeracEditor:
    """The untrained editor that ``hparams`` (a module's or a checkpoint's) describe."""
    n_in, n_out = lm.arch.mlp_out_shape(layers[0])
    scope_layer = hparams.get("scope_layer")
    return SeracEditor(
        layers,
        n_in,
        n_out,
        lm.arch.hidden_size,
        default_scope_layer(lm) if scope_layer is None else int(scope_layer),
        rank=int(hparams.get("rank", 8)),
        alpha=float(hparams.get("alpha", 16.0)),
        width=int(hparams.get("width", 256)),
    )


def prefixed_ids(tokenizer: PreTrainedTokenizerBase, context: str, ids: Sequence[int]) -> list[int]:
    """Token ids of ``context`` followed by a tokenised row ``ids`` (its leading special tokens,
    e.g. BOS, dropped where the context already starts with them), so the row's own tokens, and
    so its target's, are exactly the same after the context."""
    encoded = tokenizer(context, return_special_tokens_mask=True)
    prefix, special = list(encoded["input_ids"]), list(encoded["special_tokens_mask"])
    while prefix and special[-1]:  # a trailing EOS
        prefix.pop()
        special.pop()
    leading = 0
    while leading < len(special) and special[leading]:
        leading += 1
    row = list(ids)
    if leading and row[:leading] == prefix[:leading]:
        row = row[leading:]
    return prefix + row


@dataclass
class PrefixedBatch:
    """Rows of a :class:`~remedi.tokens.ContinuationBatch` with a context before each: the
    right-padded ids and, per row, how far its tokens moved."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    shift: torch.Tensor


def prefix_rows(
    tokenizer: PreTrainedTokenizerBase,
    batch: ContinuationBatch,
    rows: Sequence[int],
    contexts: Sequence[str],
) -> PrefixedBatch:
    """Rows ``rows`` of ``batch``, each read after its context."""
    made, shifts = [], []
    for row, context in zip(rows, contexts, strict=True):
        length = int(batch.attention_mask[row].sum())
        ids = [int(t) for t in batch.input_ids[row, :length]]
        full = prefixed_ids(tokenizer, context, ids)
        made.append(full)
        shifts.append(len(full) - len(ids))
    input_ids, mask = pad_right(made, tokenizer.pad_token_id)
    return PrefixedBatch(input_ids, mask, torch.tensor(shifts))


def target_cells(
    batch: ContinuationBatch, rows: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, position)`` of every state that predicts a target token of ``rows`` (in the
    order of ``rows``, then of the target's tokens); ``row`` indexes into ``rows``."""
    owners, positions = [], []
    for i, row in enumerate(rows):
        start = int(batch.prompt_lengths[row]) - 1
        for k in range(int(batch.target_lengths[row])):
            owners.append(i)
            positions.append(start + k)
    return torch.tensor(owners, dtype=torch.long), torch.tensor(positions, dtype=torch.long)


def counterfactual_states(
    lm: LoadedModel,
    editor: SeracEditor,
    batch: ContinuationBatch,
    rows: Sequence[int],
    contexts: Sequence[str],
) -> torch.Tensor:
    """The counterfactual model's last-block states at the target cells of ``rows`` (each read
    after its context), ``[cells, hidden]`` in :func:`target_cells` order; differentiable
    in the adapter."""
    prefixed = prefix_rows(lm.tokenizer, batch, rows, contexts)
    site = Site("block", lm.arch.num_layers - 1)
    owners, positions = target_cells(batch, rows)
    with editor.counterfactual(lm), intervene(lm.arch, record=[site]) as states:
        lm.model.base_model(
            input_ids=prefixed.input_ids.to(lm.device),
            attention_mask=prefixed.attention_mask.to(lm.device),
            use_cache=False,
        )
    shifted = positions + prefixed.shift[owners]
    return states[site][owners.to(lm.device), shifted.to(lm.device)]


def routed_generate(
    lm: LoadedModel,
    editor: SeracEditor,
    memory: Memory,
    prompt: str,
    max_new_tokens: int = 20,
    **generate_kwargs: object,
) -> str:
    """The continuation of free text ``prompt`` under SERAC with ``memory``: the
    counterfactual model's, reading the matched edit's statement first, when the prompt is in
    an edit's scope, else the LM's own (the new text only)."""
    from remedi.tokens import generate_text

    with torch.no_grad():
        routing = editor.route(query_states(lm, editor.scope_layer, [prompt]), memory)
    if not bool(routing.in_scope[0]):
        return generate_text(lm, prompt, max_new_tokens, **generate_kwargs)
    context = context_text(memory.cases[int(routing.edit[0])])
    with editor.counterfactual(lm):
        return generate_text(lm, context + prompt, max_new_tokens, **generate_kwargs)


def routed_edit(
    lm: LoadedModel,
    editor: SeracEditor,
    memory: Memory,
    own_edit: bool = False,
    batch_size: int = 32,
) -> EditContext:
    """The edit context of SERAC with ``memory``: each scored row is routed by its prompt;
    in-scope rows' target-predicting states come from the counterfactual model under the
    routed edit, the others are the LM's own. With ``own_edit`` row ``case_index`` may only
    match memory entry ``case_index`` (every case scored on its own edit)."""
    last = Site("block", lm.arch.num_layers - 1)

    @contextmanager
    def context(batch: ContinuationBatch, rows: Sequence[ScoredRow]) -> Iterator[None]:
        with torch.no_grad():
            states = block_states(lm, editor.scope_layer, batch.input_ids, batch.attention_mask)
            lengths = batch.prompt_lengths.to(states.device)
            queries = TokenStates(states, query_mask(lengths, states.shape[1]))
            allowed = torch.tensor([r.case_index for r in rows]) if own_edit else None
            routing = editor.route(queries, memory, allowed)
            chosen = [i for i in range(len(rows)) if bool(routing.in_scope[i])]
            if not chosen:
                yield
                return
            contexts = [context_text(memory.cases[int(routing.edit[i])]) for i in chosen]
            replaced = counterfactual_states(lm, editor, batch, chosen, contexts)
        owners, positions = target_cells(batch, chosen)
        rows_at = torch.tensor(chosen, dtype=torch.long)[owners].to(lm.device)
        positions = positions.to(lm.device)

        def splice(state: torch.Tensor) -> torch.Tensor:
            out = state.clone()
            out[rows_at, positions] = replaced.to(out.dtype)
            return out

        with intervene(lm.arch, edit={last: splice}):
            yield

    return context


# -- training terms (the LightningModule in lightning_modules/serac_module.py adds them up) --------
def scope_queries(cases: Sequence[EditCase]) -> tuple[list[str], list[int]]:
    """The classifier's training queries for a batch whose memory is ``cases``: each case's
    rewrite and paraphrase prompts (in scope of that case: label ``i``), and its neighbourhood
    prompts, plain and after the edit's statement as CounterFact+ reads them (hard negatives:
    same relation, another subject; label ``-1``). Every query is out of the other cases'
    scope."""
    texts: list[str] = []
    labels: list[int] = []
    for i, case in enumerate(cases):
        for prompt in [case.rewrite_prompt, *case.paraphrase_prompts]:
            texts.append(prompt)
            labels.append(i)
        for prompt in case.neighborhood_prompts:
            texts += [prompt, f"{case.edit_statement}. {prompt}"]
            labels += [-1, -1]
    return texts, labels


def scope_loss(
    scope: ScopeClassifier,
    keys: torch.Tensor,
    queries: TokenStates,
    labels: Sequence[int],
) -> dict[str, torch.Tensor]:
    """The classifier's loss for ``queries`` against a memory of key states ``[m, hidden]``
    (:func:`key_states`); query ``q`` is in the scope of key ``labels[q]`` and of no other
    (``-1``: of none). Binary cross-entropy of every (query, key) pair, in-scope and
    out-of-scope pairs weighted equally (``scope``), and the routing accuracy
    (``scope_accuracy``: the right key when in scope, none when out)."""
    device = keys.device
    logits = scope.logits(queries.to(device), scope.embed(keys))
    label = torch.tensor(list(labels), device=device)
    target = (label[:, None] == torch.arange(len(keys), device=device)[None, :]).float()
    losses = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    positive = (losses * target).sum() / target.sum().clamp(min=1)
    negative = (losses * (1 - target)).sum() / (1 - target).sum().clamp(min=1)
    with torch.no_grad():
        best = logits.max(dim=1)
        routed = torch.where(torch.sigmoid(best.values) > THRESHOLD, best.indices, -1)
        accuracy = (routed == label).float().mean()
    return {"scope": positive + negative, "scope_accuracy": accuracy}


def scope_terms(
    lm: LoadedModel, editor: SeracEditor, cases: Sequence[EditCase]
) -> dict[str, torch.Tensor]:
    """:func:`scope_loss` of a memory of ``cases`` with :func:`scope_queries` as inputs."""
    texts, labels = scope_queries(cases)
    keys = key_states(lm, editor.scope_layer, cases)
    return scope_loss(editor.scope, keys, query_states(lm, editor.scope_layer, texts), labels)


def locality_texts(
    cases: Sequence[EditCase], per_case: int, unrelated: int = 1, draw: str | None = None
) -> tuple[list[str], list[str], list[int]]:
    """``(prompts, answers, case of each)`` of the counterfactual model's locality term: the
    rows of :func:`remedi.editors.locality.locality_rows`, each neighbourhood prompt read after
    its case's statement as CounterFact+ reads it ("statement. prompt"). The classifier keys on
    the subject, so these are the out-of-scope inputs that reach the counterfactual model; the
    other cases' prompts stand for the inputs it misroutes."""
    from remedi.editors.locality import locality_rows

    prompts, answers, groups = locality_rows(cases, per_case, unrelated, draw)
    shown = [
        f"{cases[g].edit_statement}. {p}" if p in cases[g].neighborhood_prompts else p
        for p, g in zip(prompts, groups, strict=True)
    ]
    return shown, answers, groups


def counterfactual_terms(
    lm: LoadedModel,
    editor: SeracEditor,
    cases: Sequence[EditCase],
    locality: tuple[Sequence[str], Sequence[str], Sequence[int]],
) -> dict[str, torch.Tensor]:
    """The counterfactual model's loss terms: ``edit``, the mean NLL of ``target_new`` after
    each case's rewrite and paraphrase prompts read under its statement; ``loc``, KL(LM ‖
    counterfactual) at the answer tokens of the ``locality`` rows ``(prompts, answers, case
    of each)``, each read under its case's statement, summed over tokens and averaged over
    rows (the counterfactual model must answer as the LM where the edit does not apply; see
    :func:`locality_texts`)."""
    from remedi.editors.training import kl_divergence
    from remedi.tokens import encode_continuations, final_hidden, token_logprobs, unembed

    prompts, targets, owners = [], [], []
    for i, case in enumerate(cases):
        for prompt in [case.rewrite_prompt, *case.paraphrase_prompts]:
            prompts.append(prompt)
            targets.append(str(case.target_new))
            owners.append(i)
    norm = lm.arch.final_norm
    batch = encode_continuations(lm.tokenizer, prompts, targets)
    rows = list(range(len(prompts)))
    states = counterfactual_states(
        lm, editor, batch, rows, [context_text(cases[o]) for o in owners]
    )
    cells, positions = target_cells(batch, rows)
    ids = batch.target_ids[cells, positions - batch.prompt_lengths[cells] + 1].to(lm.device)
    logprobs = token_logprobs(unembed(lm.model, norm(states)).float(), ids)
    per_row = torch.zeros(len(rows), device=lm.device).index_add(0, cells.to(lm.device), logprobs)
    per_row = per_row / batch.target_lengths.to(lm.device)
    terms = {"edit": -per_row.mean(), "edit_prob": per_row.exp().mean().detach()}
    loc_prompts, answers, groups = locality
    if not loc_prompts:
        terms["loc"] = torch.zeros((), device=lm.device)
        return terms
    loc = encode_continuations(lm.tokenizer, list(loc_prompts), list(answers))
    loc_rows = list(range(len(loc_prompts)))
    cells, positions = target_cells(loc, loc_rows)
    with torch.no_grad():
        hidden = final_hidden(
            lm.model, loc.input_ids.to(lm.device), loc.attention_mask.to(lm.device)
        )
        before = hidden[cells.to(lm.device), positions.to(lm.device)]
    after = norm(
        counterfactual_states(lm, editor, loc, loc_rows, [context_text(cases[g]) for g in groups])
    )
    terms["loc"] = kl_divergence(lm.model, before.to(after.dtype), after) / len(loc_prompts)
    return terms
