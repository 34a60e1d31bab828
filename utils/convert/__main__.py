"""python -m utils.convert COMMAND ...: turn a checkpoint from elsewhere into the project's export.

    python -m utils.convert torch ckpt_epoch_240.pth runs/teachers/resnet110 --arch resnet110

The export (a directory: arrays + sidecar.json) then loads like any trained here: as a KD student,
EDFM's backbone (pretrained_resnet), GenDD's teacher (teacher_dir) or in evaluate.py. A new source
format is a module with `add_command(subparsers)` (see from_torch.py), listed in COMMANDS.
"""
import argparse
import importlib

from utils.errors import cli_main

# Modules whose add_command(subparsers) adds one subcommand each; the subcommand's parser sets
# `run` (args -> None) as its default.
COMMANDS = ("utils.convert.from_torch", "utils.convert.from_edfm_ref")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utils.convert",
        description="Convert a checkpoint from elsewhere into the project's export (a directory with the "
                    "arrays and a sidecar.json), loadable by every script. An existing destination is "
                    "never overwritten. `python -m utils.convert COMMAND --help` for each command.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_command(subparsers)
    return parser


@cli_main
def main(argv):
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
