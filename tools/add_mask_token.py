#!/usr/bin/env python
"""Give a causal LM's tokenizer a mask token from its own vocabulary, for AR -> BD3 adaptation.

    python tools/add_mask_token.py SRC_TOKENIZER_DIR OUT_DIR [--mask-token TOKEN]

Masked diffusion needs a mask id. A causal LM tokenizer (SmolLM2, Llama) has none, and megabd3 would
otherwise append one after the vocabulary (GPT-2 style). For adaptation we instead reuse an existing
special token that never occurs in the training text, because:

- the pretrained embedding table keeps its shape, so the checkpoint loads strictly, the tied output
  head keeps its rows, the vocabulary stays a multiple of 64/128 for TP, and the adapted model exports
  back to the same layout;
- the mask row starts from a trained embedding instead of a random one (its output logit is never a
  target: the SUBS parameterisation sets the mask logit to -inf).

The default is the tokenizer's last added special token (for SmolLM2 ``<empty_output>``, a code-dataset
marker that prose never contains). OUT_DIR gets the tokenizer files with ``mask_token`` set; use it as
``data.tokenizer`` for preprocessing, training, evaluation and sampling. Writes atomically.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megabd3.errors import UserError, cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC_TOKENIZER_DIR", help="tokenizer (or whole HF model) directory")
    p.add_argument("out", metavar="OUT_DIR", help="new tokenizer directory (must not exist or be empty)")
    p.add_argument("--mask-token", default="", help="an existing special token to use as mask "
                   "(default: the last added special token)")
    return p


def choose_mask_token(tok, wanted: str) -> str:  # noqa: ANN001
    """The mask token string: ``wanted`` if it is one token of the vocabulary, else the last added special token."""
    if tok.mask_token is not None:
        raise UserError(f"the tokenizer already has a mask token {tok.mask_token!r} (id {tok.mask_token_id}); "
                        "use it directly as data.tokenizer")
    if wanted:
        ids = tok.convert_tokens_to_ids([wanted])
        if ids[0] is None or ids[0] == tok.unk_token_id:
            raise UserError(f"--mask-token {wanted!r} is not a token of this vocabulary; pass one of its special "
                            f"tokens, e.g. {tok.all_special_tokens[-1]!r}")
        return wanted
    specials = [t for t in tok.added_tokens_decoder.values() if t.special]
    used = {tok.eos_token, tok.bos_token, tok.pad_token, tok.unk_token}
    candidates = [t.content for t in sorted(specials, key=lambda t: tok.convert_tokens_to_ids(t.content))
                  if t.content not in used]
    if not candidates:
        raise UserError("the tokenizer has no unused special token to reuse as mask; pass --mask-token")
    return candidates[-1]


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from transformers import AutoTokenizer

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new directory or delete it first")
    if not Path(args.src).is_dir():
        raise UserError(f"{args.src} is not a directory; pass a local tokenizer or HF model directory")
    tok = AutoTokenizer.from_pretrained(args.src, trust_remote_code=False)
    mask = choose_mask_token(tok, args.mask_token)
    tok.mask_token = mask
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tok.save_pretrained(str(tmp))
        check = AutoTokenizer.from_pretrained(str(tmp), trust_remote_code=False)
        if check.mask_token != mask or check.mask_token_id != tok.convert_tokens_to_ids(mask) or len(check) != len(tok):
            raise UserError(f"saving the tokenizer with mask_token {mask!r} did not round-trip; report this")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: mask token {mask!r} = id {tok.convert_tokens_to_ids(mask)}, vocabulary {len(tok)} "
          "(unchanged); use it as data.tokenizer")


if __name__ == "__main__":
    main()
