"""The documents cannot drift from the code: every flag of a command shown in README.md and docs/*.md
exists in that command's own parser, and every relative link points to a file (and heading) that exists."""
import re
import shlex
from pathlib import Path

import pytest

import phantom
import repro

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("repro.py", "bench.py", "phantom.py")
SEPARATORS = ("&&", "||", "|", ";")
INLINE_COMMAND = re.compile(r"`((?:\w+=\S* )*(?:python3?|torchrun|/usr/bin/time|env) [^`]*)`")


def where(path, line):
    return f"{path.relative_to(ROOT)}:{line}"


def shown_commands(path):
    """(line, text) of every command line in the file: each line of a ``` block (backslash continuations
    joined) and each inline command in the prose (`python ...`, `torchrun ...`, `OMP_NUM_THREADS=1 python ...`)."""
    commands, block, pending = [], False, None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            block, pending = not block, None
            continue
        if block:
            start, text = pending if pending else (number, "")
            text += line
            if line.rstrip().endswith("\\"):
                pending = (start, text.rstrip()[:-1] + " ")
            else:
                pending = None
                commands.append((start, text))
        else:
            commands += [(number, m) for m in INLINE_COMMAND.findall(line)]
    return commands


def invocations(path):
    """(line, script, arguments) for each call of one of SCRIPTS, whatever runs it (python, torchrun,
    /usr/bin/time, env): the arguments are the tokens after the script, up to the next separator."""
    found = []
    for line, text in shown_commands(path):
        try:
            tokens = shlex.split(text, comments=True)
        except ValueError as e:
            pytest.fail(f"{where(path, line)}: cannot split the command line ({e}): {text}")
        segment = []
        for token in tokens + [";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            scripts = [i for i, t in enumerate(segment) if Path(t).name in SCRIPTS]
            if scripts:
                i = scripts[0]
                found.append((line, Path(segment[i]).name, [t.strip("[]") for t in segment[i + 1:]]))
            segment = []
    return found


def options(parser):
    return {s for action in parser._actions for s in action.option_strings}


def subcommands(parser):
    """The subcommand parsers of an argparse parser, by name."""
    return parser._subparsers._group_actions[0].choices


def unknown_flags(check):
    """One line per flag shown in the documents that its parser lacks. ``check(script, arguments)``
    returns (the command's name, the options its parser knows, the flags shown) or None for a call it
    does not cover."""
    problems = []
    for path in DOCUMENTS:
        for line, script, arguments in invocations(path):
            checked = check(script, arguments)
            if checked is None:
                continue
            name, known, flags = checked
            for flag in flags:
                if flag.split("=")[0] not in known:
                    problems.append(f"{where(path, line)}: {flag.split('=')[0]} is not an option of `{name}`")
    return problems


def flags(arguments):
    return [a for a in arguments if a.startswith("-") and not re.fullmatch(r"-[\d.]+", a)]


def test_the_documents_show_commands_to_check():
    shown = {(script, script == "repro.py" and arguments[:1] == ["predict"])
             for path in DOCUMENTS for _, script, arguments in invocations(path)}
    assert {("repro.py", False), ("repro.py", True), ("bench.py", False), ("phantom.py", False)} <= shown


def test_every_repro_flag_in_the_documents_exists():
    def check(script, arguments):
        if script == "repro.py" and arguments[:1] != ["predict"]:
            return "python repro.py", options(repro.parser()), flags(arguments)
    problems = unknown_flags(check)
    assert not problems, "\n".join(problems)


def test_every_predict_flag_in_the_documents_exists():
    def check(script, arguments):
        if script == "repro.py" and arguments[:1] == ["predict"]:
            return "python repro.py predict", options(repro.predict_parser()), flags(arguments[1:])
    problems = unknown_flags(check)
    assert not problems, "\n".join(problems)


def test_every_phantom_flag_in_the_documents_exists():
    def check(script, arguments):
        if script == "phantom.py":
            return "python phantom.py", options(phantom.parser()), flags(arguments)
    problems = unknown_flags(check)
    assert not problems, "\n".join(problems)


def test_every_bench_flag_in_the_documents_exists():
    import bench
    commands = subcommands(bench.parser())

    def check(script, arguments):
        if script != "bench.py":
            return None
        if not arguments or arguments[0] not in commands:  # reported as an unknown subcommand
            return "python bench.py", set(commands), arguments[:1] or ["(no subcommand)"]
        return f"python bench.py {arguments[0]}", options(commands[arguments[0]]), flags(arguments[1:])
    problems = unknown_flags(check)
    assert not problems, "\n".join(problems)


def slug(heading):
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {slug(m) for m in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)}


def test_every_relative_link_resolves():
    problems = []
    for path in DOCUMENTS:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                resolved = (path.parent / file).resolve() if file else path
                if not resolved.exists():
                    problems.append(f"{where(path, number)}: {target}: no such file")
                elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                    problems.append(f"{where(path, number)}: {target}: no heading #{anchor} in {file or path.name}")
    assert not problems, "\n".join(problems)


def test_every_docs_file_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in DOCUMENTS[1:] if f"(docs/{p.name})" not in readme] == []


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    lines, words = len(text.splitlines()), len(text.split())
    assert lines <= 180 and words <= 1800, f"README.md: {lines} lines and {words} words; at most 180 and 1,800"
