"""The llama backbone (megabd3/model/llama.py) against transformers' LlamaForCausalLM through the HF
converter (megabd3/model/hf_llama.py): same logits in causal AR mode, exact round trip of the HF state
dict, the BD3 2L input and one training step through the BD3 objective, a non-default RMSNorm eps
(single process, TP = PP = 1; TP/PP layouts in tests/dist/test_llama_parallel.py)."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megabd3.config.schema import Config  # noqa: E402
from megabd3.diffusion.masks import AttentionSpec  # noqa: E402
from megabd3.errors import UserError  # noqa: E402
from megabd3.model.export import gather_full_state_dict, load_full_state_dict  # noqa: E402
from megabd3.model.hf_llama import LlamaShape, hf_to_megabd3, megabd3_to_hf, model_config_from_hf  # noqa: E402
from megabd3.model.kv_cache import KVCache  # noqa: E402
from megabd3.model.llama import check_llama_config  # noqa: E402
from megabd3.model.transformer import build_model  # noqa: E402
from megabd3.parallel.init import init_distributed  # noqa: E402

V, S = 128, 24


@pytest.fixture(scope="module", autouse=True)
def _dist() -> None:
    init_distributed(Config())


def _hf(tied: bool, eps: float = 1e-6):  # noqa: ANN202
    c = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 rms_norm_eps=eps, rope_theta=5000.0, tie_word_embeddings=tied,
                                 attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(c).eval()
    with torch.no_grad():  # HF's init leaves norms at 1: randomise them so the norm mapping is tested
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def _ours(hf, block: int = 4):  # noqa: ANN001, ANN202
    cfg = Config()
    for k, v in model_config_from_hf(hf.config).items():
        setattr(cfg.model, k, v)
    cfg.model.make_vocab_size_divisible_by = 48  # pads 128 -> 144: padded rows must stay unpredicted
    cfg.model.attention_backend = "dense"
    cfg.diffusion.block_size = block
    cfg.data.seq_len = S
    model = build_model(cfg, V)
    load_full_state_dict(model, hf_to_megabd3(hf.state_dict(), LlamaShape.from_hf_config(hf.config)))
    return cfg, model.eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_causal_logits_match_transformers_and_round_trip(tied: bool) -> None:
    hf = _hf(tied)
    _cfg, model = _ours(hf)
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(S).expand(2, S)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        out = model(ids, pos, AttentionSpec("causal", S))
    assert out.shape == (2, S, 144)
    assert bool((out[..., V:] <= -1e29).all())
    diff = (out[..., :V] - ref).abs().max().item()
    assert diff <= 1e-5, diff
    assert (("output_layer.weight" in dict(model.named_parameters())) != tied)
    back = megabd3_to_hf(gather_full_state_dict(model), LlamaShape.from_hf_config(hf.config))
    want = hf.state_dict()
    assert sorted(back) == sorted(k for k in want if not k.endswith("inv_freq"))
    for k, t in back.items():
        assert torch.equal(t, want[k]), k


def test_llama_honours_rms_norm_eps() -> None:
    """With rms_norm_eps = 0.1 (the hidden states' mean square is ~4e-4 at HF's init, so eps dominates
    every RMSNorm) the logits still match; built with the default eps instead they do not, which shows
    the comparison would catch an eps that is not passed through to megatron's norms or ours."""
    hf = _hf(tied=False, eps=0.1)
    _cfg, model = _ours(hf)
    assert _cfg.model.norm_eps == 0.1
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(S).expand(2, S)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        diff = (model(ids, pos, AttentionSpec("causal", S))[..., :V] - ref).abs().max().item()
        wrong_cfg = copy.deepcopy(_cfg)
        wrong_cfg.model.norm_eps = 1e-5
        wrong = build_model(wrong_cfg, V)
        load_full_state_dict(wrong, hf_to_megabd3(hf.state_dict(), LlamaShape.from_hf_config(hf.config)))
        wrong_diff = (wrong.eval()(ids, pos, AttentionSpec("causal", S))[..., :V] - ref).abs().max().item()
    print(f"norm_eps=0.1: max abs logit difference {diff:.2e} (built with eps 1e-5: {wrong_diff:.2e})")
    assert diff <= 1e-5, diff
    assert wrong_diff > 1e-3, wrong_diff


def test_llama_runs_bd3_input_and_a_bd3_training_step() -> None:
    from megabd3.diffusion.objectives import build_objective

    hf = _hf(tied=True)
    cfg, model = _ours(hf, block=4)
    L = S
    ids = torch.randint(0, V - 1, (2, L), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(L).expand(2, L)
    x2 = torch.cat([ids, ids], dim=1)
    with torch.no_grad():
        out = model(x2, torch.cat([pos, pos], 1), AttentionSpec("bd3", L, 4), logits_range=(0, L))
    assert out.shape == (2, L, 144) and bool(torch.isfinite(out[..., :V]).all())
    with torch.no_grad():
        clean = model(x2, torch.cat([pos, pos], 1), AttentionSpec("bd3", L, 4), logits_range=(L, 2 * L))
        first = model(ids[:, :4], pos[:, :4], AttentionSpec("full", 4))
        two = model(ids[:, :8], pos[:, :8], AttentionSpec("full", 8))
    # x_t = x0: block k of x_t sees x0 blocks < k and itself, exactly what x0 block k sees -> same rows
    assert (out[..., :V] - clean[..., :V]).abs().max().item() <= 1e-5
    # x0 block 0 sees only itself (bidirectionally): a 4-token full-attention forward
    assert (clean[:, :4, :V] - first[..., :V]).abs().max().item() <= 1e-5
    # ... which is not what full attention over 8 tokens gives it (there block 0 would see block 1)
    assert (clean[:, :4, :V] - two[:, :4, :V]).abs().max().item() > 1e-3
    # KV-cached BD3 sampling (GQA keys/values expanded before the cache) equals the 2L forward
    with torch.no_grad():
        cache = KVCache()
        for s in range(0, L, 4):
            torch.testing.assert_close(model.denoise_block(cache, ids[:, s:s + 4], s), out[:, s:s + 4],
                                       atol=1e-5, rtol=1e-5)
            model.store_block(cache, ids[:, s:s + 4], s)
    cfg.diffusion.objective = "bd3lm"
    objective = build_objective(cfg, V - 1, V)
    model.train()
    loss = objective(model, ids, torch.Generator().manual_seed(3), train=True).loss
    assert bool(torch.isfinite(loss)) and float(loss) > 0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())
    assert bool((grads["decoder.layers.0.self_attention.linear_qkv.weight"] != 0).any())


def test_llama_rejections() -> None:
    hf = _hf(tied=False)
    shape = LlamaShape.from_hf_config(hf.config)
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(UserError, match="biases"):
        hf_to_megabd3(sd, shape)
    cfg = Config()
    for k, v in model_config_from_hf(hf.config).items():
        setattr(cfg.model, k, v)
    cfg.model.num_query_groups = 3
    with pytest.raises(UserError, match="num_query_groups"):
        build_model(cfg, V)
    cfg.model.num_query_groups, cfg.model.adaln = 2, True
    with pytest.raises(UserError, match="adaLN"):
        build_model(cfg, V)
    cfg.model.adaln, cfg.parallel.tensor_parallel = False, 2
    check_llama_config(cfg)  # TP = 2: one query group per rank (tests/dist/test_llama_parallel.py)
    cfg.parallel.tensor_parallel = 4  # 2 groups cannot be split over 4 ranks
    with pytest.raises(UserError, match="num_query_groups"):
        check_llama_config(cfg)
    cfg.parallel.tensor_parallel, cfg.model.arch = 1, "gpt3"
    with pytest.raises(UserError, match="model.arch"):
        build_model(cfg, V)


def test_smollm2_135m_causal_logits_match_transformers() -> None:
    """The real judge checkpoint (tools/fetch_assets.py judge), when it is present: a Llama with GQA
    9/3 heads, 30 layers, tied embeddings, vocab 49152. Over 30 layers fp32 rounding alone moves the
    logits by ~1e-4 (transformers' own eager and sdpa paths differ by 5.7e-5 here), so 1e-5 against
    transformers' fp32 is below the noise floor: the bound is against transformers in float64, where
    ours must be no worse than transformers' own fp32 forward, and stay within 2e-4 of it."""
    from megabd3.eval.judge_assets import judge_dir

    d = judge_dir()
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"SmolLM2-135M not present in {d} (python tools/fetch_assets.py judge)")
    hf = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    cfg = Config()
    for k, v in model_config_from_hf(hf.config).items():
        setattr(cfg.model, k, v)
    cfg.model.attention_backend = "dense"
    model = build_model(cfg, vocab)
    load_full_state_dict(model, hf_to_megabd3(hf.state_dict(), LlamaShape.from_hf_config(hf.config)))
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.eval()(ids, torch.arange(16)[None], AttentionSpec("causal", 16))[..., :vocab].double()
        ref32 = hf(input_ids=ids).logits.double()
        ref64 = hf.double()(input_ids=ids).logits
    ours, theirs = (out - ref64).abs().max().item(), (ref32 - ref64).abs().max().item()
    print(f"SmolLM2-135M max abs logit error vs fp64: ours {ours:.2e}, transformers fp32 {theirs:.2e}; "
          f"ours vs transformers fp32 {(out - ref32).abs().max().item():.2e}")
    assert ours <= 1.5 * theirs and (out - ref32).abs().max().item() <= 2e-4, (ours, theirs)
