"""The documents say what the code does: the README's option table against ``config.OPTIONS``,
``docs/architecture.md``'s interval table against the constants it names, its message table
against ``protocol.MESSAGE_TYPES``, the README's layout against ``runner/queues/``, and
every ``RUNNER_*`` variable the documents name."""
from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import pytest

from runner import config, protocol

from .support import REPO

README = REPO / "README.md"
ARCHITECTURE = REPO / "docs" / "architecture.md"
_CELL_SPLIT = re.compile(r"(?<!\\)\|")  # a cell may hold an escaped pipe: `^(rmq\|sqs)_`


def table_after(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped, escaped pipes kept as ``|``) of the Markdown table whose
    header line is ``header``; raises AssertionError when there is none."""
    lines = text.splitlines()
    assert header in lines, f"no table with the header {header!r}"
    rows = []
    for line in lines[lines.index(header) + 2:]:  # past the header and its |---| line
        if not line.startswith("|"):
            break
        cells = _CELL_SPLIT.split(line.strip())[1:-1]
        rows.append([cell.strip().replace("\\|", "|") for cell in cells])
    return rows


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# -- the README's option table -------------------------------------------------------------

def readme_options() -> dict[str, list[str]]:
    """``{flag name: [its environment variables]}`` from the README's option table."""
    rows = table_after(README.read_text(), "| flag | environment | default | meaning |")
    found = {}
    for flag, env, _default, _meaning in rows:
        [name] = backticked(flag)
        assert name.startswith("--"), flag
        found[name[2:]] = backticked(env)
    return found


def test_every_option_in_the_readme_exists_with_the_variables_it_reads():
    options = {option.name: option for option in config.OPTIONS}
    documented = readme_options()
    unknown = sorted(set(documented) - set(options))
    assert not unknown, f"README documents options runner/config.py does not have: {unknown}"
    for name, env_names in documented.items():
        assert env_names == list(options[name].env_names), name


def test_every_option_is_in_the_readme():
    missing = sorted({option.name for option in config.OPTIONS} - set(readme_options()))
    assert not missing, f"options missing from README.md's table: {missing}"


def test_the_readme_table_parser_reads_escaped_pipes():
    rows = table_after("x\n| a | b |\n|---|---|\n| `^(rmq\\|sqs)_` | 2 |\n\nrest", "| a | b |")
    assert rows == [["`^(rmq|sqs)_`", "2"]]
    with pytest.raises(AssertionError):
        table_after("no table here", "| a | b |")


# -- the README's layout --------------------------------------------------------------------

def test_the_readme_layout_names_every_queue_back_end_module():
    text = README.read_text()
    layout = text[text.index("runner/queues/ "):]
    layout = layout[:layout.index("\nrunner/storage/")]
    modules = {p.name for p in (REPO / "runner" / "queues").glob("*.py")} - {"__init__.py",
                                                                            "base.py"}
    missing = sorted(name for name in modules if name not in layout)
    assert not missing, f"runner/queues modules the README's layout does not name: {missing}"


# -- RUNNER_* variables named anywhere in the documents ------------------------------------

# Variables the runner reads that are not options; each must still be read somewhere.
NOT_OPTIONS = {"RUNNER_PUREPYTHON", "RUNNER_ROLE_CONFIG", "RUNNER_SUPERVISOR_PID",
               "RUNNER_TEST_DATA"}
# Names the documents misspell on purpose (the README shows the warning a typo gets).
MISSPELT_EXAMPLES = {"RUNNER_EXECTUORS"}


def documents() -> list[Path]:
    found = [README, REPO / "Dockerfile", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "examples").rglob("*.yaml")), *sorted((REPO / "packaging").iterdir())]
    return [path for path in found if path.is_file()]


def test_every_runner_variable_the_documents_name_is_read():
    options = {name for option in config.OPTIONS for name in option.env_names}
    named = {}
    for path in documents():
        for match in re.finditer(r"\bRUNNER_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_]*\*)", path.read_text()):
            named.setdefault(match.group(0), path.relative_to(REPO))
    unknown = {name: str(where) for name, where in named.items()
               if name not in options and name not in NOT_OPTIONS | MISSPELT_EXAMPLES}
    assert not unknown, f"variables that are neither options nor in NOT_OPTIONS: {unknown}"
    sources = "\n".join(p.read_text() for folder in ("runner", "tests")
                        for p in (REPO / folder).rglob("*.py") if p.name != "test_docs.py")
    unread = sorted(name for name in NOT_OPTIONS if name not in sources)
    assert not unread, f"NOT_OPTIONS names that no code reads any more: {unread}"


# -- docs/architecture.md: intervals and messages --------------------------------------------

def interval_rows() -> list[tuple[str, str, str]]:
    rows = table_after(ARCHITECTURE.read_text(), "| interval | constant | value |")
    assert rows, "docs/architecture.md's interval table is empty"
    out = []
    for what, constant, value in rows:
        [path] = backticked(constant)
        out.append((what, path, value))
    return out


def resolve(dotted: str):
    """The object ``a.b.C.ATTR`` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
        return value
    raise ImportError(dotted)


def seconds(text: str) -> float:
    """``50 ms`` → 0.05, ``2 s`` → 2.0, ``1 min`` → 60.0; ValueError for anything else."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?) ?(ms|s|min)", text)
    if match is None:
        raise ValueError(f"not a duration: {text!r}")
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "min": 60.0}[match.group(2)]


def test_seconds_reads_the_table_units():
    assert [seconds("50 ms"), seconds("1 s"), seconds("2.5 s"), seconds("1 min")] == \
        [0.05, 1.0, 2.5, 60.0]
    with pytest.raises(ValueError):
        seconds("fast")


@pytest.mark.parametrize("what,constant,value", interval_rows(),
                         ids=[row[1] for row in interval_rows()])
def test_every_interval_in_the_architecture_page_is_its_constant(what, constant, value):
    actual = resolve(constant)
    assert isinstance(actual, (int, float)), f"{constant} is not a number of seconds"
    assert math.isclose(actual, seconds(value)), \
        f"docs/architecture.md says {what} is {value}; {constant} is {actual} s"


def test_every_message_type_is_in_the_architecture_page():
    text = ARCHITECTURE.read_text()
    rows = (table_after(text, "| message | from → to | meaning |")  # the flow
            + table_after(text, "| message | from → to | when |"))  # recovery
    # "`AttemptEnded` (`RoleCrashed`)": the parenthesis names an outcome, not a message
    listed = {name for row in rows for name in backticked(re.sub(r"\(.*?\)", "", row[0]))}
    classes = {cls.__name__ for cls in protocol.MESSAGE_TYPES.values()}
    assert classes <= listed, f"messages missing from the table: {sorted(classes - listed)}"
    assert listed <= classes, f"the table lists messages that do not exist: {sorted(listed - classes)}"
