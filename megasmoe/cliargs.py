"""Options and overrides in any order after a command's positional argument.

argparse stops at the first option it meets after a ``REMAINDER`` positional, so
``megasmoe eval RUN key=value --batches 2 key=value`` would not parse. The commands that
take a target and then overrides (``eval``, ``steer discover``, ``arena``) collect the
rest as ``args.rest`` and parse it again here with the same options, intermixed.
"""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["parse_rest"]


def parse_rest(args: argparse.Namespace, prog: str,
               add_options: Callable[..., None], error: Callable[[str], Exception],
               appended: tuple[str, ...] = ()) -> argparse.Namespace:
    """Merge the options found in ``args.rest`` into ``args``; the rest becomes
    ``args.overrides``.

    ``add_options(parser, default=...)`` declares the command's options (called with
    ``argparse.SUPPRESS`` so only options actually given appear); ``appended`` names the
    append-options whose later values extend those given before the target; ``error``
    turns argparse's message into the command's one-line error.
    """
    later = argparse.ArgumentParser(prog=prog, add_help=False, exit_on_error=False)
    add_options(later, default=argparse.SUPPRESS)
    later.add_argument("overrides", nargs="*")
    try:
        rest = later.parse_intermixed_args(args.rest)
    except argparse.ArgumentError as e:
        raise error(str(e)) from None
    for key, value in vars(rest).items():
        setattr(args, key, getattr(args, key) + value if key in appended else value)
    args.overrides = getattr(rest, "overrides", [])
    return args
