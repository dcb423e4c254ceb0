"""The experiment's command line: the client's ``args`` made into words, and the argv that runs it.

StudioML clients send ``experiment.args`` already shell-quoted (the reference worker joins
them and runs a shell); the runner makes the same words with :func:`split_args`, running no
shell, and :func:`script_command` puts the interpreter and the script in front.
"""
from __future__ import annotations

from pathlib import Path

from .errors import BadRequest


_DQ_ESCAPABLE = "$`\"\\\n"


def split_args(args: list[str]) -> list[str]:
    """Return the words a POSIX shell would make of ``" ".join(args)``, running no shell.

    Only word splitting (on space, tab, newline) and quote removal happen: ``'…'`` is literal,
    ``"…"`` is literal except that backslash escapes ``$ ` " \\`` and newline, and an unquoted
    backslash escapes the next character (backslash-newline is removed). Nothing is expanded:
    ``$HOME``, ``*.py``, ``~``, ``$(…)`` and operators like ``;`` or ``|`` stay literal text.
    ``''`` gives an empty word. Unbalanced quotes or a trailing backslash raise
    :class:`BadRequest`.
    """
    text = " ".join(str(a) for a in args)
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\n":
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
            i += 1
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise BadRequest(f"unbalanced single quote in args: {text!r}")
            cur.append(text[i + 1:end])
            in_word, i = True, end + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise BadRequest(f"unbalanced double quote in args: {text!r}")
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] in _DQ_ESCAPABLE:
                    if text[i + 1] != "\n":
                        cur.append(text[i + 1])
                    i += 2
                else:
                    cur.append(c)
                    i += 1
            in_word = True
        elif c == "\\":
            if i + 1 >= n:
                raise BadRequest(f"trailing backslash in args: {text!r}")
            if text[i + 1] != "\n":
                cur.append(text[i + 1])
                in_word = True
            i += 2
        else:
            cur.append(c)
            in_word = True
            i += 1
    if in_word:
        words.append("".join(cur))
    return words


def script_command(python: Path, filename: str, args: list[str]) -> list[str]:
    """Return the argv that runs the experiment: ``[python, filename, *words]``, or for
    ``filename == "-m"`` ``[python, "-m", module, *rest]`` where ``module`` is the first word of
    ``args`` (:class:`BadRequest` if there is none). ``words`` come from :func:`split_args`."""
    words = split_args(list(args or []))
    if filename == "-m":
        if not words or not words[0]:
            raise BadRequest("filename '-m' needs the module name as the first argument")
        return [str(python), "-m", words[0], *words[1:]]
    if not filename:
        raise BadRequest("experiment filename is empty")
    return [str(python), filename, *words]
