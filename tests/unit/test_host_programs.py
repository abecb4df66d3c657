"""Every program the code, the scripts and the tests run is installed by the project's own setup.

A developer's machine keeps whatever someone once installed by hand, so a
test command can pass there and fail on a fresh machine (it did: a test ran
``ethtool``, which nothing installed).  This test reads the sources for the
programs they run and holds each one to ``scripts/host-packages.list``, the
table that ``scripts/host-packages`` installs from:

- Python (package, tests, benchmarks, Python scripts): argv literals of
  ``subprocess``/``os.exec*`` calls and of the test helpers that wrap them,
  and ``shutil.which()`` calls, read from the syntax tree;
- shell scripts under ``scripts/``: the command words of every simple
  command (after ``;``, ``&&``, ``|``, ``$(`` ..., past ``exec``,
  ``timeout N``, ``env VAR=...``), minus builtins, keywords, the script's
  own functions and anything spelled through a variable.

A program passes when the table lists it, when the project builds it (the
venv's console scripts, ``build/`` output), or when the Debian package that
provides it here has ``Priority: required`` (on every Debian system).
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TABLE = REPO / "scripts" / "host-packages.list"

# Calls whose first argument is an argv (list/tuple literal, program first).
_ARGV_CALLS = frozenset({"run", "Popen", "check_output", "check_call", "call", "execv", "execve",
                         "execvp", "execvpe"})
# Test helpers called as helper("prog", "arg", ...).
_VARARG_CALLS = frozenset({"_sh", "sh"})
# Made by the project itself: the venv's console scripts and interpreters, build output.
_PROJECT_PROGRAMS = frozenset({"netkit", "netkit-plugin", "cni-netkit", "python", "python3",
                               "pytest", "ruff", "mypy", "lint-imports", "pyinstaller", "pip"})

# bash's keywords and builtins.
_SHELL_WORDS = frozenset([
    "!", "[[", "]]", "[", "{", "}", "(", ")", "if", "then", "else", "elif", "fi", "do", "done",
    "while", "until", "for", "in", "case", "esac", "function", "select", "time", ".", ":",
    "source", "alias", "bg", "bind", "break", "builtin", "caller", "cd", "command", "compgen",
    "complete", "continue", "declare", "dirs", "disown", "echo", "enable", "eval", "exec", "exit",
    "export", "false", "fc", "fg", "getopts", "hash", "help", "history", "jobs", "kill", "let",
    "local", "logout", "mapfile", "popd", "printf", "pushd", "pwd", "read", "readarray",
    "readonly", "return", "set", "shift", "shopt", "suspend", "test", "times", "trap", "true",
    "type", "typeset", "ulimit", "umask", "unalias", "unset", "wait",
])
# Words that run the next word as the command (after their own options/arguments).
_PREFIX = {"exec": 0, "command": 0, "nohup": 0, "setsid": 0, "time": 0, "timeout": 1, "nice": 0,
           "env": 0, "chroot": 1, "xargs": 0, "flock": 1}
_OPERATORS = {";", "&&", "||", "|", "&", "(", "{", "}", ";;", "|&", "!", "then", "do",
              "else", "elif", "if", "while", "until", "$("}


def _python_sources() -> list[Path]:
    files = [*REPO.glob("cni_netkit/**/*.py"), *REPO.glob("tests/**/*.py"),
             *REPO.glob("bench/*.py")]
    files += [p for p in _scripts() if _shebang(p) == "python"]
    return sorted(files)


def _scripts() -> list[Path]:
    return sorted(p for p in (REPO / "scripts").iterdir() if p.is_file() and _shebang(p))


def _shebang(path: Path) -> str | None:
    first = path.read_bytes()[:100].split(b"\n", 1)[0]
    if not first.startswith(b"#!"):
        return None
    if b"python" in first:
        return "python"
    return "shell" if re.search(rb"\b(ba)?sh\b", first) else None


def python_programs(source: str) -> set[str]:
    """Programs a Python module runs by literal name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0]
        if name in _ARGV_CALLS and isinstance(first, ast.List | ast.Tuple) and first.elts:
            first = first.elts[0]
        elif name == "which" or name in _VARARG_CALLS:
            pass
        else:
            continue
        if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value:
            found.add(first.value)
    return found


def _logical_lines(text: str) -> list[str]:
    """The script's commands, one per item: continuations and multi-line quotes joined,
    here-document bodies and multi-line array literals dropped."""
    lines: list[str] = []
    heredoc: str | None = None
    in_array = False
    pending = ""
    for raw in text.splitlines():
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        if in_array:
            in_array = ")" not in raw
            continue
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if _open_quote(line):
            pending = line + "\n"
            continue
        pending = ""
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            heredoc = m.group(1)
        if re.search(r"\w\+?=\([^)]*$", line):
            in_array = True  # NAME=( on its own line: its words are data, not commands
        lines.append(line)
    return lines


def _open_quote(line: str) -> bool:
    """A quote opened on this line and closed on a later one (an awk program, say)."""
    try:
        shlex.split(re.sub(r"#.*$", "", line) if line.lstrip().startswith("#") else line)
    except ValueError:
        return True
    return False


# Text that holds no command word: ${...} expansions, arithmetic, redirections,
# one-line array literals, the pattern list of a case item.
_NOT_COMMANDS = [
    (re.compile(r"\$\{[^}]*\}"), " $X "),
    (re.compile(r"\(\([^)]*\)\)"), " true "),
    (re.compile(r"\d*(?:&>|[<>]+&?)\s*(?:\d+\b|-|[^\s;&|()]+)?"), " "),
    (re.compile(r"\b\w+(\[[^]]*\])?\+?=\([^)]*\)"), " "),
    (re.compile(r"^\s*[^\s()\'\"=$]+(?:\s*\|\s*[^\s()\'\"=$]+)*\)(?!\))"), " "),
]


def shell_programs(text: str) -> set[str]:
    """Command words of a bash script that name a program (best effort, conservative)."""
    functions = set(re.findall(r"^\s*([\w-]+)\s*\(\)\s*\{", text, re.M))
    found: set[str] = set()
    for command in _logical_lines(text):
        if re.match(r"^\s*#", command):
            continue
        # Command substitutions, including those inside double quotes.
        words = re.findall(r"\$\(\s*([A-Za-z_][\w./+-]*)", command)
        line = command
        for pattern, replacement in _NOT_COMMANDS:
            line = pattern.sub(replacement, line)
        try:
            lex = shlex.shlex(line.replace("$(", " $( "), posix=True, punctuation_chars=";&|()")
            lex.commenters = "#"
            lex.wordchars += "$/.-+=:,[]{}@%^~*?"
            tokens = list(lex)
        except ValueError:
            continue
        expect, skip = True, 0
        for tok in tokens:
            if tok == ")":
                expect = False  # the end of a substitution or subshell: its value follows
                continue
            if tok in _OPERATORS:
                expect, skip = True, 0
                continue
            if not expect:
                continue
            if skip:
                skip -= 1
                continue
            if re.fullmatch(r"[A-Za-z_]\w*(\[[^]]*\])?\+?=.*", tok) or tok.startswith("-"):
                continue  # an assignment before the command, or a prefix command's option
            if tok in _PREFIX:
                skip = _PREFIX[tok]
                words.append(tok)  # a program itself, unless a builtin (filtered below)
                continue
            expect = False
            words.append(tok)
        found.update(w for w in words if w not in _SHELL_WORDS and w not in functions
                     and not w.startswith(("$", "'", '"', "./", "~"))
                     and re.fullmatch(r"/?[\w./+-]+", w))
    return found


def _table() -> dict[str, str]:
    rows = {}
    for line in TABLE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        program, package, *_ = line.split()
        if program != "-":
            rows[program] = package
    return rows


@cache
def _required_package_of(program: str) -> str | None:
    """The Priority-required Debian package providing ``program`` here, or None."""
    exe = shutil.which(program, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if exe is None:
        return None
    real = Path(exe).resolve()
    for candidate in {exe, str(real), str(real).removeprefix("/usr"), "/usr" + exe}:
        found = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True,
                               check=False)
        owners = [line.split(":", 1)[0].split(",")[0].strip() for line in
                  found.stdout.splitlines() if ": " in line and not line.startswith("diversion")]
        if found.returncode != 0 or not owners:
            continue
        package = owners[0]
        priority = subprocess.run(["dpkg-query", "-W", "-f=${Priority}", package],
                                  capture_output=True, text=True, check=False).stdout
        return package if priority == "required" else None
    return None


def _runs() -> dict[str, set[str]]:
    """program -> the files that run it."""
    runs: dict[str, set[str]] = {}
    for path in _python_sources():
        for prog in python_programs(path.read_text()):
            runs.setdefault(prog, set()).add(str(path.relative_to(REPO)))
    for path in _scripts():
        if _shebang(path) == "shell":
            for prog in shell_programs(path.read_text()):
                runs.setdefault(prog, set()).add(str(path.relative_to(REPO)))
    return runs


def _provided(program: str, table: dict[str, str]) -> bool:
    if program in table or Path(program).name in _PROJECT_PROGRAMS:
        return True
    if program.startswith(("/", "scripts/", ".venv/", "build/")) and (
        program.startswith(str(REPO)) or not program.startswith("/")
    ):
        return True  # the repo's own files
    return _required_package_of(program) is not None


def test_every_program_run_is_installed_by_the_projects_setup() -> None:
    table = _table()
    runs = _runs()
    missing = {p: sorted(where) for p, where in runs.items() if not _provided(p, table)}
    assert not missing, (
        "programs run by the project that its setup does not install (add them to "
        f"scripts/host-packages.list): {missing}"
    )


def test_the_scan_sees_the_programs_it_must() -> None:
    # The scanners themselves: a scan that found nothing would pass the test above.
    runs = _runs()
    for program in ("ip", "ethtool", "bpftool", "qemu-system-x86_64", "dpkg-deb", "unshare"):
        assert program in runs, program
    assert python_programs('subprocess.run(\n    ["ethtool", "-K"], check=True)') == {"ethtool"}
    assert python_programs('shutil.which("bpftool")\n_sh("ip", "link")') == {"bpftool", "ip"}
    assert shell_programs('x=$(findmnt -n)\nexec timeout 5 qemu -m 1\nfoo() { bar; }\nfoo\n'
                          'cat <<EOF\nnot-a-command\nEOF\nenv A=1 B=2 mkfs.ext4 x | tr a b\n') == {
        "findmnt", "timeout", "qemu", "bar", "cat", "env", "mkfs.ext4", "tr"}


def test_each_table_row_names_a_real_debian_package() -> None:
    for line in TABLE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        fields = line.split()
        assert len(fields) >= 4, f"row needs program, package, groups and why: {line!r}"
        assert re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", fields[1]), line
        assert set(fields[2].split(",")) <= {"venv", "test", "vm", "bpf", "shim", "artifact",
                                             "image"}, line


@pytest.mark.parametrize("group", ["venv", "test", "vm", "bpf", "shim", "artifact"])
def test_host_packages_knows_each_group(group: str) -> None:
    out = subprocess.run([str(REPO / "scripts" / "host-packages"), "packages", group],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out, group
