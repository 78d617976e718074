"""Worker for the resume tests: a tiny torch model trained by the real Trainer/engine/checkpoint code.

Usage: python resume_tiny_worker.py RUN_DIR STEPS SAVE_INTERVAL ZERO [KILL_AT_STEP] [KILL_IN_SAVE_STEP]
Writes one line per step {"step", "loss", "grad_norm"} to RUN_DIR/losses.jsonl (rank 0). KILL_AT_STEP
SIGKILLs the process right after that optimizer step; KILL_IN_SAVE_STEP SIGKILLs it while the
checkpoint of that step is being written (after the engine files, before model.pt).
The model has dropout and the objective draws noise, so exact resume needs every RNG restored.
"""
import json
import os
import signal
import sys
import types
from pathlib import Path

from megabd3.training.launch import prepare_environment

prepare_environment()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Tiny(nn.Module):
    def __init__(self, V: int = 64, d: int = 32) -> None:
        super().__init__()
        self.emb, self.l1, self.drop, self.out = nn.Embedding(V, d), nn.Linear(d, d), nn.Dropout(0.2), nn.Linear(d, V)

    def forward(self, ids):  # type: ignore[no-untyped-def]
        return self.out(self.drop(torch.tanh(self.l1(self.emb(ids)))))


def objective(model_fn, x0, gen, train=True, attention_mask=None):  # type: ignore[no-untyped-def]
    masked = torch.rand(x0.shape, generator=gen) < torch.rand(x0.shape[0], 1, generator=gen)
    logits = model_fn(torch.where(masked, torch.zeros_like(x0), x0)).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0.reshape(-1), reduction="none")
    ce = ce * masked.reshape(-1)
    return types.SimpleNamespace(loss=ce.mean(), nelbo_sum=ce.detach().sum(), token_count=ce.numel())


def main() -> None:
    run_dir, steps, save_interval, zero = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    kill_at = int(sys.argv[5]) if len(sys.argv) > 5 else -1
    kill_in_save = int(sys.argv[6]) if len(sys.argv) > 6 else -1
    import deepspeed
    import torch.distributed as dist

    from megabd3.config.schema import Config
    from megabd3.training import checkpoint as ckpt
    from megabd3.training.engine import Stepper, build_engine
    from megabd3.training.ema import EMA
    from megabd3.training.logging import RunLogger
    from megabd3.training.loop import Trainer, TrainerParts
    from megabd3.training.rng import seed_everything

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = Config()
    cfg.training.run_dir, cfg.training.steps, cfg.training.micro_batch_size = run_dir, steps, 2
    cfg.training.log_interval, cfg.training.eval_interval, cfg.training.ema = 1, 0, 0.99
    cfg.checkpoint.save_interval, cfg.checkpoint.keep_last_n = save_interval, 2
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 3
    cfg.logging.wandb_mode, cfg.logging.progress_bar, cfg.logging.plot = "disabled", False, False
    seed_everything(1)
    model = Tiny()
    ds = {"train_batch_size": 2 * world, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": zero}, "gradient_clipping": 1.0, "steps_per_print": 10**9}
    engine = build_engine(model, cfg, ds, torch.device("cpu"), total_steps=steps)
    ema = EMA(list(engine.module.parameters()), cfg.training.ema)
    stepper = Stepper(engine, objective, seed=1, micro_batch_size=2, grad_accum=1, dp_rank=rank, dp_size=world,
                      device=torch.device("cpu"))
    data = torch.randint(1, 64, (4096, 16), generator=torch.Generator().manual_seed(3))

    def make_loader(consumed: int):  # type: ignore[no-untyped-def]
        i = consumed
        while True:
            s = i + rank * 2
            yield {"input_ids": data[s % 4096: s % 4096 + 2]}
            i += 2 * world

    layout = {"world_size": world, "tp": 1, "pp": 1, "zero": zero}
    parts = TrainerParts(engine=engine, stepper=stepper, ema=ema, make_loader=make_loader, evaluate=None,
                         write_config=lambda d: (Path(d) / "config.json").write_text("{}"), config_dict={},
                         layout=layout, tokens_per_sample=16)
    state, rng, last = ckpt.TrainState(layout=layout), None, None
    if rank == 0:
        ckpt.remove_partial(ckpt.checkpoints_dir(run_dir))
    dist.barrier()
    found = ckpt.read_latest(run_dir)
    if found is not None:
        state, rank_state = ckpt.load_checkpoint(engine, ema, found, layout)
        rng, last = rank_state["rng"], found
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    out = open(Path(run_dir) / "losses.jsonl", "a", buffering=1) if rank == 0 else None

    def after_step(step, stats):  # type: ignore[no-untyped-def]
        if out:
            out.write(json.dumps({"step": step, "loss": stats.loss, "grad_norm": stats.grad_norm}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    parts.after_step = after_step
    if kill_in_save > 0:
        real = ckpt.atomic_torch_save

        def dying_save(obj, path):  # type: ignore[no-untyped-def]
            if Path(path).name == ckpt.MODEL_FILE and f"step_{kill_in_save:08d}" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, path)

        ckpt.atomic_torch_save = dying_save
    trainer = Trainer(cfg, parts, state, rank=rank, world_size=world, dp_size=world, last_checkpoint=last)
    logger = RunLogger(cfg, Path(run_dir), rank, state.step, steps)
    trainer.train(logger, rng_to_restore=rng)
    logger.close()


if __name__ == "__main__":
    main()
