"""The `headwise` command line: one sub-command per job."""
import argparse
import sys


def _params(args) -> None:
    from headwise.model import ModelConfig
    from headwise.model.count import params_table
    print(params_table(ModelConfig.preset(args.preset), args.preset))


def build_parser() -> argparse.ArgumentParser:
    from headwise.model import PRESETS
    parser = argparse.ArgumentParser(prog="headwise", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    params = commands.add_parser("params", help="where a model's parameters are")
    params.add_argument("--preset", default="gpt3-175b", choices=list(PRESETS),
                        metavar="NAME", help=f"one of: {', '.join(PRESETS)}")
    params.set_defaults(run=_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"headwise {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
