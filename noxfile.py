"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s typecheck`, `nox -s bench`,
`nox -s slow` (the real-size tests), `nox -s tests_torch211` (the test suite under the GPU
machine's Python and torch)."""

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

# torch and torchvision are pinned to the builds this project is tested with; a plain
# `torch` requirement would pull a multi-GB CUDA build on machines that need none.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# What the lent GPU machine runs (Python 3.12): checked here on the CPU before device time is
# spent. PyPI has only the CUDA build of this release for Linux, a few GB with its libraries.
TORCH_GPU_MACHINE = ["torch==2.11.0", "torchvision==0.26.0"]


def install_project(session: nox.Session, extras: str, torch: list[str] = TORCH) -> None:
    session.install(*torch)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest arguments after --)."""
    install_project(session, "test,export,view")
    session.run("pytest", *session.posargs)


@nox.session(default=False)
def slow(session: nox.Session) -> None:
    """Run the real-size tests (minutes on a 2-core CPU), which the default run leaves out."""
    install_project(session, "test,export,view")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(python="3.12", default=False)
def tests_torch211(session: nox.Session) -> None:
    """Run the test suite under torch 2.11 and Python 3.12, as on the GPU machine."""
    install_project(session, "test,export", TORCH_GPU_MACHINE)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install("ruff")
    session.run("ruff", "check", "samkd", "tests", "benchmarks", "scripts", "noxfile.py")
    session.run(
        "ruff", "format", "--check", "samkd", "tests", "benchmarks", "scripts", "noxfile.py"
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy."""
    install_project(session, "dev")
    session.run("mypy", "samkd")


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmark and update BENCHMARKS.md."""
    install_project(session, "test")
    session.run("python", "-m", "benchmarks", *session.posargs)
