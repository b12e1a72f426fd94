"""``fasttrain <command> [args]``: the project's commands behind one console entry point (setup.py);
each also runs as ``python -m <module>``, and the main job as ``accelerate launch fasttrain/run.py``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command: (module with main(argv), what it does)
    "train": ("fasttrain.run", "pretrain with a recipe, evaluate, write results.json (--eval-only, --random-init)"),
    "export": ("fasttrain.export", "a checkpoint's encoder as a torchvision ResNet state dict"),
    "convert": ("loaders.ffcv_convert", "an ImageFolder to an FFCV .beton"),
    "selftest": ("fasttrain.selftest", "every loader x precision x compile path this machine supports"),
    "demo-data": ("fasttrain.demo_data", "Debian's Fashion-MNIST as JPEG ImageFolders for the demo"),
    "imagenet-subset": ("loaders.imagenet_subset", "a class subset of an ImageFolder (ImageNet-100) as links"),
    "upgrade-checkpoint": ("fasttrain.engine.checkpoint", "rewrite a trusted checkpoint of an earlier fasttrain"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: fasttrain <command> [args]   (fasttrain <command> --help for its own)\n\n" + "\n".join(
        f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"fasttrain: error: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    module, rest = COMMANDS[argv[0]][0], argv[1:]
    if argv[0] == "upgrade-checkpoint":
        rest = ["--upgrade-trusted", *rest]
    return importlib.import_module(module).main(rest)


if __name__ == "__main__":
    sys.exit(main())
