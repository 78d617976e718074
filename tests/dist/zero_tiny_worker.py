"""Worker for test_training_zero.py: tiny model, real build_engine/Stepper; prints per-step (loss, grad_norm, lr) as JSON.
args: ZERO_STAGE GRAD_ACCUM (micro batch 4 per rank; clipping 0.3 is active)."""
from megabd3.training.launch import prepare_environment
prepare_environment()
import os, sys, json, types
import torch, torch.nn as nn, torch.nn.functional as F

class Tiny(nn.Module):
    def __init__(s, V=50, d=16):
        super().__init__(); s.emb = nn.Embedding(V, d); s.l1 = nn.Linear(d, d); s.out = nn.Linear(d, V)
    def forward(s, ids):
        return s.out(torch.tanh(s.l1(s.emb(ids))))
def objective(model_fn, x0, gen, train=True, attention_mask=None):
    noise = torch.rand(x0.shape, generator=gen, device=x0.device) < 0.5
    xt = torch.where(noise, torch.zeros_like(x0), x0)
    logits = model_fn(xt).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0.reshape(-1), reduction="none")
    return types.SimpleNamespace(loss=ce.mean(), nelbo_sum=ce.detach().sum(), token_count=ce.numel())
def main():
    import deepspeed
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist
    from megabd3.training.engine import build_engine, Stepper
    from megabd3.config.schema import Config
    zero, ga = int(sys.argv[1]), int(sys.argv[2])
    world = dist.get_world_size(); rank = dist.get_rank()
    cfg = Config(); cfg.optim.warmup_steps = 2; cfg.optim.lr = 1e-2; cfg.optim.grad_clip = 0.3
    torch.manual_seed(0); model = Tiny()
    mb = 4
    ds = {"train_batch_size": mb*ga*world, "train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": ga,
          "zero_optimization": {"stage": zero}, "gradient_clipping": 0.3, "steps_per_print": 10**9}
    eng = build_engine(model, cfg, ds, torch.device("cpu"), total_steps=10)
    st = Stepper(eng, objective, seed=1, micro_batch_size=mb, grad_accum=ga, dp_rank=rank, dp_size=world, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(5); data = torch.randint(1, 50, (1000, 8), generator=g)
    consumed = 0; losses = []
    for step in range(6):
        def it():
            for i in range(ga):
                s = consumed + (i*world + rank)*mb
                yield {"input_ids": data[s:s+mb]}
        r = st.step(it(), consumed, step); consumed += mb*ga*world; losses.append((r.loss, r.grad_norm, r.lr))
    if rank == 0: print(json.dumps(losses))
    # tear the group down in step: a rank exiting while gloo threads still run can abort at shutdown
    dist.barrier(); dist.destroy_process_group()
if __name__ == "__main__":
    main()
