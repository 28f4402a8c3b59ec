"""``tfcompile``: one console script, a subcommand per tool.

    tfcompile compile model.onnx --target x86 -o out.onnx   # = python -m passes.compile
    tfcompile export minilm -o minilm.onnx
    tfcompile bench minilm.onnx --target native --seq 128
    tfcompile embed minilm --texts sentences.txt -o emb.npy
    tfcompile generate model_with_past.onnx --tokens 64
    tfcompile demo

Each subcommand takes exactly the options of its module's ``main`` (``tfcompile compile --help``);
the modules are imported only when their subcommand runs, so ``tfcompile --help`` stays instant.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["SUBCOMMANDS", "main"]

#: subcommand -> (module holding ``main(argv)``, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "compile": ("passes.tools.compile", "compile an ONNX transformer for a hardware target"),
    "export": ("passes.tools.export", "export a transformers model to ONNX (TorchScript or dynamo)"),
    "bench": ("passes.tools.bench", "time original, peers and ours in one interleaved run"),
    "embed": ("passes.tools.embed", "sentence embeddings with a compiled model (tokenize, run, pool)"),
    "generate": ("passes.tools.generate", "greedy decoding with a KV-cache decoder"),
    "demo": ("passes.tools.demo", "export the shipped MiniLM, compile it, print before/after"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: tfcompile <command> [options]   (tfcompile <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its subcommand's ``main``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown command {name!r} (known: {', '.join(SUBCOMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
