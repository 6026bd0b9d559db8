"""The README's and docs/ pages' copy-paste blocks run as written (on the embedded world), so a newcomer's first hour
works; every shell block says whether a test runs it, and every relative link resolves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The `<!-- tested: NAME -->` blocks the tests below run; a new name needs a test that runs its blocks.
RUN_BY_TESTS = {"quickstart", "activate", "howto", "pretrain", "plugins"}
SHELL_FENCE = re.compile(r"^(\s*)```(bash|sh|shell|console|zsh)\s*$")
MARKER = re.compile(r"^\s*<!-- (tested: [\w-]+|not tested: \S.*\S) -->\s*$")


def pages() -> list[Path]:
    """The front page, then each docs page: where copy-paste blocks live."""
    return [README, *sorted(DOCS.glob("*.md"))]


def readme_blocks(marker: str, only: list[Path] | None = None) -> list[str]:
    """The bash blocks marked ``<!-- tested: marker -->``, in page order (README first), wherever they now live."""
    return [
        block
        for page in only or pages()
        for block in re.findall(rf"<!-- tested: {marker} -->\n```bash\n(.*?)```", page.read_text(), flags=re.S)
    ]


def test_quick_start_names_setup_and_the_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1].split("##", 1)[0]
    (block,) = readme_blocks("quickstart", only=[README])
    assert block in quick
    commands = block.strip().splitlines()
    assert commands == [
        "bash scripts/setup.sh && .venv/bin/promptkd demo",
        "bash scripts/setup.sh && .venv/bin/python -m pytest",
    ]
    # CI runs the second command exactly as written: that is what makes the block tested.
    assert commands[1] in (ROOT / ".ci/run").read_text().splitlines()


def shell_blocks(page: Path) -> list[tuple[int, str, str]]:
    """(line number, the line before the fence, the fence) for each shell code block of ``page``."""
    lines, found, fence = page.read_text().splitlines(), [], None
    for number, line in enumerate(lines, 1):
        if fence is not None:
            if line.strip() == "```":
                fence = None
            continue
        if line.lstrip().startswith("```"):
            fence = line
            if SHELL_FENCE.match(line):
                found.append((number, lines[number - 2] if number > 1 else "", line))
    return found


def test_every_shell_block_says_whether_a_test_runs_it():
    """A copy-paste block either is run by a test or says why not, on the line just before it."""
    unmarked, names = [], set()
    for page in pages():
        for number, before, _ in shell_blocks(page):
            match = MARKER.match(before)
            if match is None:
                unmarked.append(f"{page.relative_to(ROOT)}:{number}")
            elif match.group(1).startswith("tested: "):
                names.add(match.group(1).removeprefix("tested: "))
    assert not unmarked, (
        "shell blocks without '<!-- tested: NAME -->' or '<!-- not tested: reason -->' on the line before: "
        + ", ".join(unmarked)
    )
    assert names == RUN_BY_TESTS, f"tested blocks no test runs: {names - RUN_BY_TESTS}; gone: {RUN_BY_TESTS - names}"


def test_block_check_catches_an_unmarked_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- tested: howto -->\n```bash\nls\n```\n\ntext\n  ```sh\n  pwd\n  ```\n```python\nx\n```\n")
    found = [(number, bool(MARKER.match(before))) for number, before, _ in shell_blocks(page)]
    assert found == [(2, True), (7, False)]


def outside_code_blocks(text: str) -> str:
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def prose(text: str) -> str:
    """``text`` without code blocks and code spans, where brackets and parentheses are code, not links."""
    return re.sub(r"`[^`]*`", "", outside_code_blocks(text))


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub gives ``page``: lower case, punctuation dropped, spaces to hyphens, repeats -1, -2."""
    slugs: set[str] = set()
    counts: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", outside_code_blocks(page.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        repeat = counts.get(slug, 0)
        counts[slug] = repeat + 1
        slugs.add(slug if repeat == 0 else f"{slug}-{repeat}")
    return slugs


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", prose(page.read_text())):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(file, page.parent)})")
    return broken


def test_every_relative_link_resolves():
    """Pages moved into docs/ keep working links and pictures: each relative target exists (and its heading)."""
    broken = {str(page.relative_to(ROOT)): links for page in pages() if (links := broken_links(page))}
    assert not broken, broken


def test_link_check_catches_a_missing_file_and_heading(tmp_path):
    (tmp_path / "other.md").write_text("# A `code` title: here\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-code-title-here) ![img](gone.png) [bad](other.md#nope) `[code](nowhere)` [web](https://x.y)\n"
    )
    assert broken_links(page) == ["gone.png (no such file)", "other.md#nope (no heading #nope in other.md)"]


def test_docs_pages_say_why_link_back_and_are_linked_from_the_front_page():
    front = README.read_text()
    for page in sorted(DOCS.glob("*.md")):
        title, blank, why = page.read_text().splitlines()[:3]
        assert title.startswith("# ") and not blank, page.name
        assert why.startswith("*Read this") and "](../README.md)" in why, page.name
        assert f"](docs/{page.name})" in front, f"README.md does not link docs/{page.name}"


def user_shell(tmp_path: Path) -> dict[str, str]:
    """A fresh folder laid out like the repository after the quick start (``.venv`` there), and a PATH without the
    environment: the README's own activation line must be what puts ``promptkd`` on the PATH."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    bin_dir = str(Path(sys.executable).parent)
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if entry and entry != bin_dir]
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join(path)}


def as_user_runs(block: str) -> str:
    """The README's activation block, then ``block``, as a user pastes them into a new shell."""
    (activate,) = readme_blocks("activate")
    return activate + block


def test_activation_puts_promptkd_on_the_path(tmp_path):
    """Pasted as written after the quick start, ``promptkd`` is found (it lives in ``.venv/bin``)."""
    env = user_shell(tmp_path)
    assert subprocess.run(["bash", "-c", "command -v promptkd"], cwd=tmp_path, env=env).returncode != 0
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", as_user_runs("promptkd --help >/dev/null && command -v promptkd")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent.resolve() == Path(sys.executable).parent.resolve()


@pytest.mark.slow
def test_howto_blocks_run_as_written(tmp_path):
    """The three practitioner paths in order (distil on a folder, predict, export to ONNX + onnxruntime), in a fresh
    folder with the installed `promptkd` and `python` on PATH; `pip install` lines only check the extra is there."""
    blocks = readme_blocks("howto")
    assert len(blocks) == 3
    script = "\n".join(blocks)
    script = re.sub(r"^pip install .*$", 'python -c "import onnx, onnxruntime"', script, flags=re.M)
    env = user_shell(tmp_path)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", as_user_runs(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "runs/my-student/predictions.csv").is_file()
    assert "predicted: " in result.stdout


def run_block(marker: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The one block marked ``marker``, run as a user would in ``tmp_path``; fails the test unless it exits 0."""
    (block,) = readme_blocks(marker)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", as_user_runs(block)],
        cwd=tmp_path,
        env=user_shell(tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_pretrain_block_runs_as_written(tmp_path):
    """Pre-training on the world's corpus through the engine, then the model it wrote, used by another command."""
    result = run_block("pretrain", tmp_path)
    assert (tmp_path / "runs/my-clip/open_clip_model.safetensors").is_file()
    assert "zero-shot clean/held_out" in result.stdout and "acc1" in result.stdout


@pytest.mark.slow
def test_plugins_block_runs_as_written(tmp_path):
    """A CoOp prompt on the world's base classes, the DPC stage over it, and the checkpoint it wrote."""
    result = run_block("plugins", tmp_path)
    assert "method: dpc" in result.stdout and "base.text.ctx" in result.stdout
    assert "base " in result.stdout and "HM " in (tmp_path / "runs/coop-dpc/train.log").read_text()
