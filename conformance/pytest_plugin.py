"""pytest glue for the conformance suites: one test per case, parametrized by the case's name.

A content plugin's test module needs one line::

    from berth.conformance.pytest_plugin import content_store_tests

    test_my_store = content_store_tests(open_my_store)          # a factory, see berth.conformance.content

which collects ``test_my_store[Writer]`` ... ``test_my_store[SharedNamespaceIsolate]``. The
cross-namespace cases are skipped, with containerd's reason, unless ``open_namespaced_store`` is
given. A factory that needs fixtures (a daemon, say) can be named instead: pass the name of a
fixture whose value is the factory, e.g. ``content_store_tests("remote_open_store")``.

A snapshotter's, likewise (it collects ``test_my_snapshotter[Basic]`` ...
``test_my_snapshotter[128LayersMount]``; see :mod:`berth.conformance.snapshotter`)::

    from berth.conformance.pytest_plugin import snapshotter_tests

    test_my_snapshotter = snapshotter_tests(open_my_snapshotter)

A runtime plugin's (``test_my_runtime[CreateStartWait]`` ... ``[WaitMany]``, run through a live berthd;
see :mod:`berth.conformance.runtime`)::

    from berth.conformance.pytest_plugin import runtime_tests

    test_my_runtime = runtime_tests("open_my_runtime")          # a fixture returning the factory

Each content and snapshotter test runs its case in a fresh ``trio.run`` under its own ``tmp_path``, so it works with or
without pytest-trio; the factories must open everything they need inside their context manager.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from berth.conformance.content import (
    CONTENT_CASES,
    TIME_SLACK,
    CaseNotApplicable,
    OpenNamespacedStore,
    OpenStore,
    run_content_case,
)
from berth.conformance.runtime import RUNTIME_CASES, OpenRuntime, run_runtime_case
from berth.conformance.snapshotter import SNAPSHOTTER_CASES, OpenSnapshotter, RenameSupport, run_snapshotter_case

__all__ = ["content_store_tests", "runtime_tests", "snapshotter_tests"]



def _case_names(cases: Iterable[str] | None, known: Iterable[str], kind: str) -> list[str]:
    """``cases`` (default: every one of ``known``, in order); KeyError for a name not in ``known``."""
    known = list(known)
    names = list(cases) if cases is not None else known
    for name in names:
        if name not in known:
            raise KeyError(f"no {kind} case {name!r}; the cases are {', '.join(known)}")
    return names

def content_store_tests(open_store: OpenStore | str, *, open_namespaced_store: OpenNamespacedStore | str | None = None,
                        cases: Iterable[str] | None = None, time_slack: float = TIME_SLACK) -> Callable[..., None]:
    """A pytest test function parametrized over ``cases`` (default: all 16, in containerd's order).

    ``open_store`` and ``open_namespaced_store`` are factories, or names of fixtures that return them.

    Raises:
        KeyError: an unknown case name.
    """
    names = _case_names(cases, CONTENT_CASES, "content")

    def resolve(factory: Any, request: pytest.FixtureRequest) -> Any:
        return request.getfixturevalue(factory) if isinstance(factory, str) else factory

    @pytest.mark.parametrize("case", names)
    def test_content_store(case: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        plain = CONTENT_CASES[case].policy is None  # resolve only the fixture the case uses
        run = partial(run_content_case, case, resolve(open_store, request) if plain else None, tmp_path,
                      open_namespaced_store=None if plain else resolve(open_namespaced_store, request),
                      time_slack=time_slack)
        try:
            trio.run(run)
        except CaseNotApplicable as reason:
            pytest.skip(str(reason))

    test_content_store.__doc__ = "containerd's content testsuite case ``case`` (berth.conformance.content)."
    return test_content_store


def snapshotter_tests(open_snapshotter: OpenSnapshotter | str, *, cases: Iterable[str] | None = None,
                      can_rename_lower_dirs: RenameSupport = True) -> Callable[..., None]:
    """A pytest test function parametrized over the snapshotter ``cases`` (default: all 21, in order).

    ``open_snapshotter`` is a factory (see :mod:`berth.conformance.snapshotter`) or the name of a
    fixture returning one; ``can_rename_lower_dirs`` is passed on to the Rename case. The cases
    mount for real: they are skipped unless the tests run as root. What a case left out (see
    :func:`~berth.conformance.snapshotter.run_snapshotter_case`) is printed and recorded in the
    test's ``user_properties`` as ``("conformance-note", text)``.

    Raises:
        KeyError: an unknown case name.
    """
    names = _case_names(cases, SNAPSHOTTER_CASES, "snapshotter")

    @pytest.mark.parametrize("case", names)
    def test_snapshotter(case: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        if os.geteuid() != 0:
            pytest.skip("the snapshotter cases mount filesystems: run as root")
        factory = request.getfixturevalue(open_snapshotter) if isinstance(open_snapshotter, str) else open_snapshotter
        notes = trio.run(partial(run_snapshotter_case, case, factory, tmp_path,
                                 can_rename_lower_dirs=can_rename_lower_dirs))
        for note in notes:
            print(f"{case}: {note}")
            request.node.user_properties.append(("conformance-note", note))

    test_snapshotter.__doc__ = "containerd's snapshotter testsuite case ``case`` (berth.conformance.snapshotter)."
    return test_snapshotter


def runtime_tests(open_runtime: OpenRuntime | str, *, cases: Iterable[str] | None = None) -> Callable[..., None]:
    """A pytest test function parametrized over the runtime ``cases`` (default: all, in order).

    ``open_runtime`` is a factory (see :mod:`berth.conformance.runtime`) or the name of a fixture
    returning one. The cases run real containers: they are skipped unless the tests run as root.

    Raises:
        KeyError: an unknown case name.
    """
    names = _case_names(cases, RUNTIME_CASES, "runtime")

    @pytest.mark.parametrize("case", names)
    def test_runtime(case: str, request: pytest.FixtureRequest) -> None:
        if os.geteuid() != 0:
            pytest.skip("the runtime cases run containers: run as root")
        factory = request.getfixturevalue(open_runtime) if isinstance(open_runtime, str) else open_runtime
        with factory() as target:
            run_runtime_case(case, target)

    test_runtime.__doc__ = "the task lifecycle case ``case`` (berth.conformance.runtime)."
    return test_runtime
