"""Command line: `python -m crosspool_jax.checkpoints convert SRC DST [--dtype D]` writes an orbax
checkpoint from a Hugging Face folder; `... info PATH` prints what `load_model` would load."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crosspool_jax.checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="Hugging Face folder -> orbax folder")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: keep)")
    info = sub.add_parser("info", help="config and parameter sizes of a checkpoint folder")
    info.add_argument("path")
    info.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    from crosspool_jax.checkpoints import CheckpointError, load_model
    from crosspool_jax.checkpoints.orbax_io import convert
    from crosspool_jax.models import param_bytes
    try:
        if args.command == "convert":
            print(convert(args.src, args.dst, dtype=args.dtype))
        else:
            m = load_model(args.path, dtype=args.dtype)
            print(json.dumps({"name": m.name, "architecture": m.config.architecture,
                              "layers": m.config.num_layers, "ffn_kinds": list(m.config.ffn_kinds),
                              "kv_params_bytes": param_bytes(m.kv_params),
                              "ffn_params_bytes": param_bytes(m.ffn_params),
                              "eos_token_ids": list(m.eos_token_ids),
                              "tokenizer": m.tokenizer is not None}, indent=1))
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
