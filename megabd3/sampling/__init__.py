"""Samplers: BD3-LM block sampler (KV-cached), MDLM, AR and SEDD, plus stop rules and nucleus."""
from megabd3.sampling.common import SampleResult, SamplerOptions
from megabd3.sampling.registry import SAMPLERS, build_sampler, options_from_config

__all__ = ["SAMPLERS", "SampleResult", "SamplerOptions", "build_sampler", "options_from_config"]
