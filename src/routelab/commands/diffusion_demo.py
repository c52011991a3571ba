"""`routelab diffusion-demo`: a small MoE DiT on scikit-learn's 8×8 digits with a chosen router; a sample grid per
class and a classifier-accuracy quality number."""

from __future__ import annotations

import argparse

from routelab.commands import fail


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "diffusion-demo",
        help="train a small MoE diffusion transformer on the 8x8 digits of scikit-learn; write a sample grid",
        description="Train a small class-conditional DiT with MoE FFNs (flow matching, classifier-free guidance) on "
        "scikit-learn's 1,797 real 8x8 digits with a chosen router, then write samples.png (one row per class), "
        "report.md and result.json with the accuracy of a classifier trained on real digits on the samples.",
    )
    parser.add_argument("--router", default="topk", help="a registered router (default: %(default)s)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a router option (repeatable; VALUE is read as YAML: 2, 0.5, true, linear)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    parser.add_argument("--samples-per-class", type=int, default=8, help="samples per class (default: %(default)s)")
    parser.add_argument("--sample-steps", type=int, default=24, help="Euler steps when sampling (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=2.0,
                        help="classifier-free guidance scale; 1 = the conditional model (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    parser.add_argument("--out", default="runs/diffusion-demo", help="output folder (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that is not a run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            return fail("diffusion-demo", f"--option must be KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            return fail("diffusion-demo", f"--option {key}: value {value!r} is not a YAML scalar")
    for name, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--samples-per-class", args.samples_per_class, 1), ("--sample-steps", args.sample_steps, 1),
                             ("--seed", args.seed, 0), ("--threads", args.threads, 1)):
        if value < low:
            return fail("diffusion-demo", f"{name} must be an integer >= {low}, got {value}")
    if not args.guidance >= 0:
        return fail("diffusion-demo", f"--guidance must be a number >= 0, got {args.guidance}")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return fail("diffusion-demo", "needs scikit-learn (the digits ship with it): pip install 'routelab[diffusion]'")
    import torch

    from routelab._runs import RunFolderError
    from routelab.train.dit_demo import run_diffusion_demo

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run_diffusion_demo(
            out_dir=args.out, router=args.router, router_options=options, steps=args.steps,
            batch_size=args.batch_size, samples_per_class=args.samples_per_class, sample_steps=args.sample_steps,
            guidance=args.guidance, seed=args.seed, overwrite=args.overwrite,
        )
    except (ValueError, TypeError, RunFolderError) as exc:
        return fail("diffusion-demo", exc)
    finally:
        torch.set_num_threads(previous)
    print(f"classifier accuracy on generated digits: {result['generated_accuracy']:.1%} "
          f"(the same classifier on held-out real digits: {result['real_heldout_accuracy']:.1%})")
    print(f"samples: {args.out}/samples.png; report: {args.out}/report.md")
    return 0
