"""One optimizer step's forward/backward through megatron's pipeline schedule (PP > 1, ZeRO-1).

The diffusion objectives are written as `objective(model_fn, x0, generator, ...)`: they draw the noise,
call the model once and reduce its logits to a loss. A pipeline splits that call across ranks, so we run
the objective twice per micro-batch with identically seeded generators (the objectives are stateless):

1. *capture* (every stage, when megatron asks for the micro-batch): `model_fn` records its arguments
   (noised ids, positions, AttentionSpec, sigma, logits range) and aborts -- the inputs are identical
   on all stages because the data and the (seed, sample index) generator are;
2. *replay* (last stage, megatron's loss function): `model_fn` returns the logits the pipeline computed,
   so the objective's reduction and weighting run unchanged and autograd flows back through the stages.

Megatron divides each micro-batch loss by the number of micro-batches itself, matching DeepSpeed's
gradient-accumulation scaling of the PP = 1 path. The "schedmod" recipe (reference cpu_distributed.md
section E): forward through `engine.module` (no DeepSpeed hooks); the caller then runs a zero-valued
`engine.backward` for ZeRO-1's reduction epilogue and `engine.step()`.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import torch


class _Captured(Exception):
    """Raised by the capturing model_fn to stop the objective right after the model call."""


def capture_model_call(objective: Any, x0: torch.Tensor, generator: torch.Generator,
                       attention_mask: torch.Tensor | None) -> dict[str, Any]:
    """The model inputs the objective would use for `x0` with `generator` (no forward pass)."""
    box: dict[str, Any] = {}

    def model_fn(input_ids, position_ids, attn, sigma=None, logits_range=None):  # type: ignore[no-untyped-def]
        box.update(input_ids=input_ids, position_ids=position_ids, attn=attn, sigma=sigma, logits_range=logits_range)
        raise _Captured

    try:
        objective(model_fn, x0, generator, train=True, attention_mask=attention_mask)
    except _Captured:
        return box
    raise RuntimeError("the objective returned without calling the model")


def run_pipeline(engine: Any, objective: Any, batches: list[dict[str, torch.Tensor]],
                 make_generator: Callable[[int], torch.Generator], micro_batch_size: int) -> list[SimpleNamespace]:
    """Forward+backward of `batches` (one optimizer step) through megatron's schedule.

    `make_generator(i)` returns a fresh generator for micro-batch i (and re-seeds torch's global RNG,
    i.e. dropout, for it). Returns per-micro-batch (loss, nelbo_sum, token_count) on the last stage,
    [] on the others.
    """
    from megabd3.parallel.pipeline import pipeline_forward_backward, stage_seq_length

    module = engine.module

    def inputs(i: int) -> dict[str, Any]:
        b = batches[i]
        return capture_model_call(objective, b["input_ids"], make_generator(i), b.get("attention_mask"))

    class Feed:
        """Megatron pulls micro-batches lazily, right before each forward: re-seed dropout there."""

        def __init__(self) -> None:
            self.i = 0

        def __iter__(self) -> "Feed":
            return self

        def __next__(self) -> dict[str, Any]:
            i, self.i = self.i, self.i + 1
            return dict(inputs(i), index=i)

    def loss_fn(logits: torch.Tensor, batch: dict[str, Any]):  # type: ignore[no-untyped-def]
        b = batches[batch["index"]]
        out = objective(lambda *a, **k: logits, b["input_ids"], make_generator(batch["index"]), train=True,
                        attention_mask=b.get("attention_mask"))
        return out.loss, {"loss": out.loss.detach(), "nelbo_sum": out.nelbo_sum, "token_count": out.token_count}

    seq = stage_seq_length(module, inputs(0)["position_ids"].shape[-1])
    logs = pipeline_forward_backward(module, Feed(), len(batches), loss_fn, seq_length=seq,
                                     micro_batch_size=micro_batch_size)
    return [SimpleNamespace(**{k: logs_i[k] for k in ("loss", "nelbo_sum", "token_count")}) for logs_i in (logs or [])]


class PipelineModelFn:
    """The interface's ``model_fn`` for forward-only use (evaluation, clip search) with PP > 1.

    Every stage of a pipeline calls it with the same arguments (the objective draws its noise before the
    model call, from generators seeded alike on all stages); one micro-batch runs through megatron's
    forward-only schedule. The last stage returns the real logits; the other stages get zero logits of
    the same shape so that the objective's reduction, its data-parallel (and tensor-parallel)
    collectives and its generator draws run identically everywhere. Their numbers are meaningless:
    callers take the metrics of the last stage (``clip_search.from_last_stage``).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn: Any,
                 sigma: torch.Tensor | None = None, logits_range: tuple | None = None) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        from megabd3.parallel.pipeline import is_last_stage, pipeline_forward_backward, stage_seq_length

        box: dict[str, torch.Tensor] = {}

        def keep_logits(logits: torch.Tensor, batch: dict[str, Any]):  # type: ignore[no-untyped-def]
            box["logits"] = logits  # no copy: forward-only, megatron only divides the (zero) loss
            return logits.new_zeros(()), {}

        batch = dict(input_ids=input_ids, position_ids=position_ids, attn=attn, sigma=sigma,
                     logits_range=logits_range)
        b, n = position_ids.shape[0], position_ids.shape[-1]
        pipeline_forward_backward(self.module, iter([batch]), 1, keep_logits, forward_only=True,
                                  seq_length=stage_seq_length(self.module, n), micro_batch_size=b)
        if is_last_stage():
            return box["logits"]
        rows = (logits_range[1] - logits_range[0]) if logits_range is not None else n
        vocab = self.module.padded_vocab_size // ps.get_tensor_model_parallel_world_size()
        return torch.zeros(b, rows, vocab, device=position_ids.device)
