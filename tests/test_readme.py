"""README's first two commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START = " && .venv/bin/dispatcher run"


def readme_commands() -> tuple[str, str]:
    text = (REPO / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    install, test = (line.split("  #", 1)[0].strip() for line in block.strip().splitlines()[:2])
    return install, test


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    install, test = readme_commands()
    assert install.endswith(START)
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install.removesuffix(START) in ci
    assert test in ci
    assert ci.index(install.removesuffix(START)) < ci.index(test)
