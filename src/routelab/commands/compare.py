"""`routelab compare`: the main job — the same small MoE LM trained once per router variant, reported side by side."""

from __future__ import annotations

import argparse
import sys

from routelab.commands import fail


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compare",
        help="train the same small MoE LM once per router (same seed, data, batches, budget) and report side by side",
        description="Train the same small MoE language model once per router variant, with the same seed, data, "
        "batch order and token budget, and write a report folder (report.md, results.json, plots, config.yaml).",
    )
    parser.add_argument("--preset", default="default", help="smoke (under a minute), default (about 10 minutes), "
                         "depth (routing across layers and depth, 3 seeds), paper (40–60 minutes, measured; 3 seeds) "
                         "or diffusion (a masked-diffusion LM, a few minutes) (default: %(default)s)")
    parser.add_argument("--routers", nargs="+", metavar="NAME",
                         help="variants or routers to run, comma- or space-separated (default: every preset entry "
                         "whose router is registered)")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files, each one domain "
                         "(default: the built-in corpus from the Python standard library)")
    parser.add_argument("--steps", type=int, help="training steps per variant (overrides the preset)")
    parser.add_argument("--seed", type=int, help="seed of every variant (overrides the preset; rerun with another "
                         "seed to see how much of a difference is noise)")
    parser.add_argument("--seeds", type=int, help="train every variant with N seeds (--seed, --seed+1, ...) and report "
                         "mean ± 95%% t-interval of perplexity and each variant's paired loss difference to the first "
                         "variant (overrides the preset's `seeds`; default 1)")
    parser.add_argument("--out", help="report folder (default: runs/compare-<preset>); a non-empty folder that is "
                         "not a routelab run is refused (see --overwrite)")
    parser.add_argument("--config", metavar="YAML", help="a YAML file merged over the preset")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted comparison in --out")
    parser.add_argument("--overwrite", action="store_true",
                         help="write into a non-empty --out that is not a routelab run (files of routelab's names are "
                         "replaced; nothing else there is deleted)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1,
                         help="torch threads (default: %(default)s; these small models gain little from more threads, "
                         "and lose much when the cores are shared with other work)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Validate everything (config, routers, data files) before training; errors print one clear line, exit 2.
    Ctrl-C prints one line saying how to continue (exit 130); atomic writes leave no partial file behind."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        out = args.out or f"runs/compare-{args.preset}"
        print(f"\nroutelab compare: interrupted; continue with --resume (same options, --out {out})", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from routelab._runs import RunFolderError
    from routelab.compare import ConfigError, resolve, run_compare
    from routelab.data.corpus import DataError
    from routelab.train import distributed

    if distributed.launched():  # torchrun: every rank trains every variant (DP + EP); rank 0 writes and prints
        distributed.init()
        args.quiet = args.quiet or not distributed.is_main()
    routers = [name.strip() for item in args.routers or [] for name in item.split(",") if name.strip()]
    if args.routers is not None and not routers:
        return fail("compare", f"--routers needs at least one router or variant name, got {' '.join(args.routers)!r}")
    if args.out is not None and not args.out.strip():
        return fail("compare", "--out must name a folder, got an empty string")
    try:
        cfg, notes = resolve(preset=args.preset, config_file=args.config, routers=routers or None,
                             data_files=args.data, steps=args.steps, seed=args.seed,
                             seeds=args.seeds)
        if cfg["data"].get("source") == "files":
            from routelab.data.corpus import file_corpus

            file_corpus(cfg["data"]["files"])  # missing, unreadable or empty files fail here, before any training
    except (ConfigError, DataError) as exc:
        return fail("compare", exc)
    for note in notes if distributed.is_main() else []:
        print(f"note: {note}", file=sys.stderr)
    if args.threads < 1:
        return fail("compare", f"--threads must be >= 1, got {args.threads}")
    out = args.out or f"runs/compare-{args.preset}"
    if not args.quiet:
        names = ", ".join(v["name"] for v in cfg["variants"])
        print(f"routelab compare: preset {args.preset}, {len(cfg['variants'])} variants ({names}) → {out}")
    try:
        summary = run_compare(cfg, out_dir=out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
                              notes=notes, threads=args.threads)
    except (ConfigError, DataError, RunFolderError) as exc:
        return fail("compare", exc)
    failed = [v for v in summary["variants"] if "error" in v]
    for v in failed if distributed.is_main() else []:
        print(f"variant {v['name']} failed: {v['error']}", file=sys.stderr)
    if distributed.is_main():
        print(f"report: {out}/report.md ({summary['wall_seconds']:.0f} s)")
    return 1 if failed else 0
