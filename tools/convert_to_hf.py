#!/usr/bin/env python
"""Export a megabd3 checkpoint as a Hugging Face directory in the released BD3-LM layout.

    python tools/convert_to_hf.py runs/demo /tmp/hf_demo [--weights ema|live]

RUN_OR_CKPT: a run directory, its checkpoints/ directory, a checkpoints/step_* directory or a model.pt.
OUT_DIR must not exist or be empty. It gets config.json, model.safetensors, configuration_bd3lm.py +
modeling_bd3lm.py (plain torch + SDPA remote code), the tokenizer files and a README.md model card; load
it with transformers.AutoModelForMaskedLM.from_pretrained(OUT_DIR, trust_remote_code=True).
Supported objectives: bd3lm (any L'), mdlm, ar, sedd.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabd3.errors import cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--weights", choices=("ema", "live"), default="ema",
                   help="EMA weights (what evaluation reports, default) or the live training weights")
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from megabd3.hf.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, weights=args.weights)
    import json

    causal = json.loads((out / "config.json").read_text()).get("model_type") == "llama"
    how = (f"AutoModelForCausalLM.from_pretrained({str(out)!r}); the BD3 denoiser runs with --checkpoint {out}" if causal
           else f"AutoModelForMaskedLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    print(f"wrote {out} (load with {how})")


if __name__ == "__main__":
    main()
