"""`promptkd models`: list model names and pretrained tags, and which of them load offline."""

from __future__ import annotations

import argparse

from promptkd.cli import validate as v

HELP = "list model names and pretrained tags, and which are available offline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "filter", nargs="?", type=v.text, default=None, help="only models whose name contains this text"
    )
    parser.add_argument("--offline", action="store_true", help="only what loads without a download")
    parser.add_argument(
        "--cache-dir", type=v.output_folder, default=None, help="Hugging Face / open_clip cache folder to look in"
    )
    parser.add_argument(
        "--download",
        nargs=2,
        type=v.text,
        metavar=("MODEL", "TAG"),
        help="download MODEL/TAG into the cache (on a connected machine) and exit",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from promptkd.backbones.catalog import catalog
    from promptkd.cli.common import print_json, print_table

    if args.download:
        from promptkd.backbones import load_backbone

        backbone = load_backbone(args.download[0], args.download[1], cache_dir=args.cache_dir)
        print(f"downloaded {backbone.spec.model_name} / {backbone.spec.pretrained}; it now loads offline.")
        return 0
    entries = [e for e in catalog(args.filter or "", args.cache_dir) if e.offline or not args.offline]
    if args.json:
        print_json([asdict(e) for e in entries])
        return 0
    rows = [
        (e.model, e.tag or "(random init)", "yes" if e.offline else "no", "yes" if e.quick_gelu else "no", e.source)
        for e in entries
    ]
    print_table(["model", "pretrained tag", "offline", "quick_gelu", "source"], rows)
    n_offline = sum(e.offline for e in entries if e.tag)
    print(
        f"\n{len(entries)} entries; {n_offline} pretrained tags are in the local cache. Any model also loads from "
        "a weight file: --model NAME --pretrained /path/to/file (.pt, .bin, .safetensors)."
    )
    return 0
