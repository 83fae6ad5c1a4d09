"""The help every example script owes its flags: a text, and the default (appended by
capstriton.training.cli.HelpFormatter, or stated by the help itself when the default is unset)."""
import argparse

from capstriton.training.cli import HelpFormatter


def assert_every_flag_documented(parser: argparse.ArgumentParser) -> str:
    """Every action but -h has a help text that names its default; returns the rendered help."""
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or (not action.option_strings and action.required):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
        assert "default" in formatter._get_help_string(action), f"{action.option_strings or action.dest}: no default"
    return parser.format_help()
