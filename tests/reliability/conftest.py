"""Reliability suites: shared fixtures and the session's summary table.

Kernel-touching tests carry ``@pytest.mark.kernel``; the session-wide gate in
tests/conftest.py skips them outside the VM (and fails them in the VM when
they cannot run). Each suite reports cases tried, failures and leaks found
through the ``figures`` fixture; at the end of the session one table is
printed and the same figures are written as JSON to
``$CNI_NETKIT_TEST_OUT/reliability.json`` (or next to ``--junitxml``) when
that directory is writable; a run that cannot reach the kernel (the host)
writes ``reliability-host.json`` instead, so the two never overwrite each
other.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import kernel_skip_reason
from tests.reliability.figures import Figures

_FIGURES = pytest.StashKey[Figures]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_FIGURES] = Figures()


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config) -> Figures:
    return pytestconfig.stash[_FIGURES]


def _json_path(config: pytest.Config) -> Path | None:
    """Where the figures go: the VM run's reliability.json, the host run's beside it."""
    name = "reliability.json" if kernel_skip_reason() is None else "reliability-host.json"
    out = os.environ.get("CNI_NETKIT_TEST_OUT")
    if out:
        return Path(out) / name
    xml = config.getoption("xmlpath", None)
    if xml:  # scripts/test's host and VM runs write their JUnit files to one directory
        return Path(xml).parent / name
    return None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    figures = config.stash.get(_FIGURES, None)
    if figures is None or not figures.suites:
        return
    terminalreporter.section("reliability figures")
    for line in figures.table():
        terminalreporter.write_line(line)
    path = _json_path(config)
    if path is None:
        return
    try:
        path.write_text(figures.to_json(kernel=os.uname().release) + "\n")
    except OSError as e:
        terminalreporter.write_line(f"(not written to {path}: {e.strerror})")
    else:
        terminalreporter.write_line(f"written to {path}")


# --- kernel fixtures (used by @pytest.mark.kernel tests only) -----------------------

_names = itertools.count()


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Named network namespaces made with iproute2, as a runtime pins pod netns."""
    made: list[str] = []

    def make() -> str:
        name = f"rel-{os.getpid()}-{next(_names)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        return f"/var/run/netns/{name}"

    yield make
    for name in made:
        if Path(f"/var/run/netns/{name}").exists():
            subprocess.run(["ip", "netns", "del", name], check=False)
