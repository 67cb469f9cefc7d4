"""The commands the documentation shows exist: every `python -m experiments.X` in a fenced shell block of README.md,
BENCHMARKS.md or docs/*.md names an entry point that exists, every `--flag` it passes is one of that entry point's
flags, every `--config.a.b` is a field of the config the command runs (its `--config=FILE:VARIANT`, else the entry
point's default), and every `make X` is a target of the Makefile.

Each command line is also parsed by its entry point's own flag parser (values and config field types included), in
one child process (tests/entry_point_flags.py) for all of them, since entry points define flags of the same name.
Commands with template syntax (`[--optional]`, `...`) are refused: every command must run as written, placeholder
paths aside."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
PUNCTUATION = set("&|;<>()")  # shell operators: a command ends at each
UNCLOSED = "<a quote never closed>"


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of a fenced shell block: where it is, and its words (comments dropped, continuations joined)."""

    where: str
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


def doc_files() -> list[pathlib.Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(text: str, source: str) -> list[Command]:
    """The commands of the fenced shell blocks of a markdown text: continuation lines joined, comments dropped,
    split at `&&`, `|`, `;` and the like; each named by the line it starts on."""
    commands, in_block, shell, pending, first = [], False, False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"\s*```\s*([\w-]*)", line)
        if fence:
            if pending:  # the block ended inside a quoted argument
                commands.append(Command(f"{source}:{first}", (UNCLOSED, pending)))
                pending = ""
            in_block, shell = not in_block, (not in_block) and fence.group(1) in SHELL_LANGUAGES
            continue
        if not shell:
            continue
        first = first if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        try:  # a quoted argument may span lines (python -c "...")
            commands += _split(pending + line, f"{source}:{first}")
            pending = ""
        except ValueError:
            pending += line + "\n"
    return commands


def _split(script: str, where: str) -> list[Command]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, words = [], []
    for token in list(lexer):
        if set(token) <= PUNCTUATION:
            if words:
                commands.append(Command(where, tuple(words)))
            words = []
        else:
            words.append(token)
    if words:
        commands.append(Command(where, tuple(words)))
    return commands


def entry_point(command: Command) -> str | None:
    """`experiments.X` of a `python -m experiments.X ...` command (a package's X runs X.__main__), else None."""
    words = command.words
    for i, word in enumerate(words[:-2]):
        if re.fullmatch(r"(.*/)?python3?(\.\d+)?", word) and words[i + 1] == "-m" and words[i + 2].startswith(
                "experiments"):  # fmt: skip
            return words[i + 2]
    return None


def module_of(entry: str) -> str:
    spec = importlib.util.find_spec(entry) if _exists(entry) else None
    return f"{entry}.__main__" if spec is not None and spec.submodule_search_locations is not None else entry


def arguments(command: Command) -> list[str]:
    words = command.words
    return list(words[words.index(entry_point(command)) + 1:])


@functools.cache
def _config_module(path: pathlib.Path):
    loaded = importlib.util.spec_from_file_location(f"_docs_config_{path.stem}", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def config_fields(spec: str) -> set[str]:
    """Every dotted field path of `FILE[:VARIANT]`'s get_config(VARIANT) (sections and leaves)."""
    path, _, variant = spec.partition(":")
    path = pathlib.Path(path) if pathlib.Path(path).is_absolute() else ROOT / path
    module = _config_module(path.resolve())
    fields = set()

    def walk(config, prefix):
        for key, value in config.items():
            fields.add(prefix + key)
            if hasattr(value, "items"):
                walk(value, f"{prefix}{key}.")

    walk(module.get_config(variant or None), "")
    return fields


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M)}


def problems(commands: list[Command], entry_flags: dict, parse_errors: dict, targets: set[str]) -> list[str]:
    """What is wrong with the commands: an entry point, a flag, a config field or a make target that does not exist,
    template syntax, or a command line the entry point's parser refuses. `entry_flags` and `parse_errors` are
    tests/entry_point_flags.py's answer (check_in_child)."""
    found, fields_cache = [], {}
    for command in commands:
        where = f"{command.where}: `{command.text}`"
        if command.words[0] == UNCLOSED:
            found.append(f"{where}: a quote is never closed")
            continue
        found += [f"{where}: template syntax {w!r} does not run as written" for w in command.words
                  if w == "..." or (w.startswith("[") and "--" in w)]  # fmt: skip
        if command.words[0] == "make":
            found += [f"{where}: no make target {t!r} in the Makefile"
                      for t in command.words[1:] if not t.startswith("-") and "=" not in t and t not in targets]
            continue
        entry = entry_point(command)
        if entry is None:
            continue
        module = module_of(entry)
        known = entry_flags.get(module)
        if known is None or "error" in known:
            found.append(f"{where}: no entry point {entry} ({known['error'] if known else 'not found'})")
            continue
        flag_names, bools = set(known["flags"]), set(known["bools"])
        args = arguments(command)
        config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), known["config"])
        before = len(found)
        for arg in args:
            if not arg.startswith("--"):
                continue
            name = arg[2:].split("=", 1)[0]
            if name.startswith("config.") and "config" in flag_names and config:
                if config not in fields_cache:
                    fields_cache[config] = config_fields(config)
                if name.removeprefix("config.") not in fields_cache[config]:
                    found.append(f"{where}: {config.removeprefix(str(ROOT) + '/')} has no field {name!r}")
            elif name not in flag_names and not (name.startswith("no") and name[2:] in bools):
                found.append(f"{where}: {entry} has no flag --{name}")
        refused = parse_errors.get((module, tuple(args)))
        if len(found) == before and refused:  # the names exist; a value or their combination does not parse
            found.append(f"{where}: {entry}'s flag parser refuses it: {refused}")
    return found


def check_in_child(commands: list[Command]) -> tuple[dict, dict]:
    """The flags of every entry point the commands name, and what each one's parser says of its command line."""
    lines = sorted({(module_of(e), tuple(arguments(c))) for c in commands
                    if (e := entry_point(c)) is not None and _exists(e)})  # fmt: skip
    request = {"modules": sorted({m for m, _ in lines}), "commands": [[m, list(a)] for m, a in lines]}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "entry_point_flags.py")], input=json.dumps(request),
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return answer["flags"], dict(zip(lines, answer["parse_errors"]))


def _exists(entry: str) -> bool:
    try:
        return importlib.util.find_spec(entry) is not None
    except ModuleNotFoundError:  # experiments.missing.sub
        return False


# The checker's own check: commands spelt right, and each kind of misspelling.
GOOD = """```bash
JAX_PLATFORMS=cpu .venv/bin/python -m experiments.train_nq --workdir=w \\
    --config=experiments/configs/nq.py:tiny --config.model.n_docs=2  # a comment --bad
python -m experiments.eval_nq --model=m --questions=q --output=o --noscore && make test
python -m experiments.bench.scann_recall --quick  # an argparse entry point
```
"""
BAD = """```bash
python -m experiments.eval_nq --modle=m
python -m experiments.train_nq --config.model.n_dcos=2
python -m experiments.evaluate_nq --model=m
make tests
python -m experiments.eval_nq --model=m --model_type=sequnce
python -m experiments.train_nq --config.model.n_docs=two
python -m experiments.build_index --encoder=e --passages=p --output=o [--backend=exact] ...
python -m experiments.bench.scann_recall --quik
python -m experiments.ask --model=m "when was it?
```
"""


@pytest.fixture(scope="module")
def checked():
    """Every command of the documentation and of GOOD / BAD, and what the child process says of them."""
    docs = [c for path in doc_files() for c in shell_commands(path.read_text(encoding="utf-8"),
                                                              str(path.relative_to(ROOT)))]  # fmt: skip
    good, bad = shell_commands(GOOD, "good.md"), shell_commands(BAD, "bad.md")
    return docs, good, bad, *check_in_child(docs + good + bad)


def test_documented_commands_exist(checked):
    docs, _, _, entry_flags, parse_errors = checked
    assert len([c for c in docs if entry_point(c)]) >= 20  # the extraction found the documentation's commands
    assert not problems(docs, entry_flags, parse_errors, makefile_targets())


def test_the_checker_catches_misspellings(checked):
    """A misspelt flag, config field, entry point, make target or value, and template syntax, each show; the right
    spellings pass."""
    _, good, bad, entry_flags, parse_errors = checked
    assert [c.words[-1] for c in good] == ["--config.model.n_docs=2", "--noscore", "test", "--quick"]
    assert not problems(good, entry_flags, parse_errors, makefile_targets())
    found = problems(bad, entry_flags, parse_errors, makefile_targets())
    assert [p.split(": ", 1)[0] for p in found] == [f"bad.md:{n}" for n in (2, 3, 4, 5, 6, 7, 8, 8, 9, 10)], found
    assert "has no flag --modle" in found[0] and "has no field 'config.model.n_dcos'" in found[1]
    assert "no entry point experiments.evaluate_nq" in found[2] and "no make target 'tests'" in found[3]
    assert "parser refuses it" in found[4] and "sequnce" in found[4]
    assert "parser refuses it" in found[5]
    assert "template syntax '[--backend=exact]'" in found[6] and "template syntax '...'" in found[7]
    assert "experiments.bench.scann_recall has no flag --quik" in found[8] and "never closed" in found[9]


# ----------------------------------------------------------------------------------------------- links


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown text's headings: lower case, punctuation dropped, spaces to hyphens, a repeated
    heading numbered -1, -2, ..."""
    anchors, in_block = set(), False
    for line in text.splitlines():
        if re.match(r"\s*```", line):
            in_block = not in_block
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not in_block:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def broken_links(path: pathlib.Path) -> list[str]:
    """Relative links and images of a markdown file (outside code blocks) whose file or heading does not exist."""
    text, broken = path.read_text(encoding="utf-8"), []
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{path.relative_to(ROOT)}: {target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{path.relative_to(ROOT)}: {target}: no heading #{anchor} in {linked.name}")
    return broken


def test_links_between_the_documents_resolve():
    assert heading_anchors("# What `make run` shows\n## Does it fit? (v4-32)\n## Does it fit? (v4-32)\n") == {
        "what-make-run-shows", "does-it-fit-v4-32", "does-it-fit-v4-32-1"}
    assert not [b for path in doc_files() for b in broken_links(path)]


def test_benchmarks_md_has_a_section_per_benchmark():
    """BENCHMARKS.md is organised by benchmark: each of experiments.bench's sub-benchmarks has its section saying
    what it times, the command that runs it, and its latest figures."""
    from experiments import bench  # pylint: disable=g-import-not-at-top

    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    for name in bench.BENCHMARKS:
        assert name in sections, f"BENCHMARKS.md has no '## {name}' section"
        body = sections[name]
        assert "**What it times**" in body and "**Latest**" in body, name
        assert re.search(rf"python -m experiments\.bench --benchmarks=\S*\b{name}\b", body), name
