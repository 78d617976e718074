"""The allowed values of string-valued config fields.

Kept here (not imported from the registries in ``megabd3.diffusion``) so that loading and validating a
config never imports torch. ``tests/unit/test_config_validate.py`` checks these tuples against the
registries once those exist, so the two cannot drift apart.
"""
from __future__ import annotations

OBJECTIVES = ("ar", "mdlm", "bd3lm", "sedd")
DIFFUSION_OBJECTIVES = ("mdlm", "bd3lm")  # the masked-diffusion NELBO objectives a weighting applies to
NOISE_TYPES = ("loglinear", "square", "square_root", "log", "cosine", "gaussian", "bimodal_gaussian")
WEIGHTINGS = ("none", "edm", "iddpm", "sigmoid", "fm", "simple")
TIME_MODES = ("uniform", "tuned")
ATTENTION_BACKENDS = ("auto", "dense", "tiled", "flex")
INITS = ("reference", "megatron")
DATA_MODES = ("wrap", "pad")
LR_SCHEDULES = ("constant", "cosine")
NAN_POLICIES = ("stop", "skip")
CUDA_GRAPH_MODES = ("auto", "on", "off")  # sampling.cuda_graphs (megabd3/model/static_cache.py)
PRECISIONS = ("auto", "fp32", "bf16")
DIST_BACKENDS = ("auto", "nccl", "gloo")
ZERO_STAGES = (0, 1, 2, 3)
WANDB_MODES = ("offline", "online", "disabled")
NUCLEUS_RULES = ("reference", "hf")
