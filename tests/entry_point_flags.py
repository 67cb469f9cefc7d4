"""Child process of tests/test_docs.py: reads the flags of entry points and parses command lines with them.

  python tests/entry_point_flags.py < {"modules": [MODULE, ...], "commands": [[MODULE, [ARG, ...]], ...]}

prints {"flags": {MODULE: {"flags", "bools", "config"} or {"error"}}, "parse_errors": [null or a message, ...]}.

Each entry point defines its absl flags when imported, and loads the library only inside `main`, so importing it is
cheap. A command line is parsed as the entry point parses it: the module imported afresh with sys.argv set to it
(ml_collections creates the `--config.a.b` override flags from sys.argv at import), then absl's parser, which also
checks values (enums, integers, config field types). Between two imports the entry point's flags are removed, as
train_nq and train_retriever both define --config. argparse entry points (bench.scann_recall) are read by running
their `main` up to `parse_args`.
"""

import argparse
import contextlib
import importlib
import io
import json
import sys

from absl import app, flags


class _ParserFound(Exception):
    """Raised in place of argparse's parse_args, carrying the parser `main` built."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def _argparse_parser(module) -> argparse.ArgumentParser | None:
    if not hasattr(module, "main") or "argparse" not in open(module.__file__, encoding="utf-8").read():
        return None

    def found(parser, *args, **kwargs):
        raise _ParserFound(parser)

    original, argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_args, found
    try:
        module.main()
    except _ParserFound as e:
        return e.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    return None


def _unload(name: str) -> None:
    """Forgets module `name` (`from package import module` would find it on its package otherwise)."""
    sys.modules.pop(name, None)
    package, _, attribute = name.rpartition(".")
    if package in sys.modules and hasattr(sys.modules[package], attribute):
        delattr(sys.modules[package], attribute)


def _forget(name: str) -> None:
    """Removes the entry point's module, every flag an `experiments` module defined, the modules that defined them
    (an alias such as eval_nq defines its flags by importing experiments.evaluate: the next import must define them
    again) and the config overrides."""
    _unload(name)
    for flag in list(flags.FLAGS):
        defining = flags.FLAGS.find_module_defining_flag(flag) or ""
        if defining.startswith("experiments") or flag.startswith("config."):
            delattr(flags.FLAGS, flag)
            _unload(defining)


def _import(name: str, args: list[str]):
    _forget(name)
    sys.argv = [name, *args]
    return importlib.import_module(name)


def describe(name: str) -> dict:
    """The flags `name` accepts, which are booleans (--noX), and its default config FILE[:VARIANT] if it has one."""
    try:
        module = _import(name, [])
    except Exception as e:  # pylint: disable=broad-except
        return {"error": f"{type(e).__name__}: {e}"}
    f = flags.FLAGS
    known = {n: f[n].flag_type() == "bool" for n in f}
    # _import removed every experiments flag first, so a --config here was defined by this import: by `name` or by
    # the module an alias imports (train_nq's is experiments.train's)
    own_config = "config" in f and (f.find_module_defining_flag("config") or "").startswith("experiments")
    parser = _argparse_parser(module)
    if parser is not None:
        known.update({o[2:]: isinstance(a, argparse._StoreTrueAction)  # pylint: disable=protected-access
                      for o, a in parser._option_string_actions.items() if o.startswith("--")})  # fmt: skip
    return {"flags": sorted(known), "bools": sorted(n for n, b in known.items() if b),
            "config": f["config"].default_as_str.strip("'\"") if own_config else None}  # fmt: skip


def parse_error(name: str, args: list[str]) -> str | None:
    """None if `name` accepts the command line `args`, else what its parser said."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            module = _import(name, args)
            parser = _argparse_parser(module)
            if parser is not None:
                parser.parse_args(args)
            else:
                flags.FLAGS(sys.argv)
        return None
    except SystemExit as e:  # argparse's error, or an entry point's own one-line refusal
        return f"{e.code}: {stderr.getvalue().strip()[-500:]}"
    except Exception as e:  # pylint: disable=broad-except
        return f"{type(e).__name__}: {e}"
    finally:
        flags.FLAGS.unparse_flags()


def main() -> None:
    request = json.load(sys.stdin)
    app.define_help_flags()
    described = {name: describe(name) for name in request["modules"]}
    errors = [parse_error(name, args) if "error" not in described.get(name, {"error": 1}) else None
              for name, args in request["commands"]]  # fmt: skip
    print(json.dumps({"flags": described, "parse_errors": errors}))


if __name__ == "__main__":
    main()
