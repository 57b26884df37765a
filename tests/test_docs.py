"""The README and docs/: their tables are the reports' tables, their links resolve, CI runs the README's
commands, and the commands they show run as shown (on the reduced repository)."""

import re
import shlex
import sys

import pytest
from typer.testing import CliRunner

from cli import app
from helpers import ROOT, run
from pipeline.eval.includes import first_table, include_tables

README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CHEAP = {"inspect", "check-params", "table"}  # read-only subcommands that take seconds on the reduced repository


def doc_id(path):
    return path.relative_to(ROOT).as_posix()


def shown_commands(document) -> list[list[str]]:
    """The ``python cli.py ...`` lines of a document's ```bash blocks, as words (comments dropped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", document.read_text(), re.S | re.M)
    words = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()]
    return [command for command in words if command[:2] == ["python", "cli.py"]]


def is_cheap(command: list[str]) -> bool:
    return "--help" in command or command[2] in CHEAP


SHOWN = [command for document in DOCUMENTS for command in shown_commands(document)]


def report_file(tmp_path, name="reports/table.md"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nA note.\n\n| other | table |\n")
    return path


def test_first_table_is_the_first_run_of_table_lines():
    assert first_table("# T\n\n| a |\n|---|\n| 1 |\ntext\n| b |\n") == "| a |\n|---|\n| 1 |\n"
    assert first_table("| a |\n| 1 |") == "| a |\n| 1 |\n"
    with pytest.raises(ValueError, match="notes.md holds no Markdown table"):
        first_table("no table here\n", "notes.md")


def test_include_rewrites_only_the_block_between_the_markers(tmp_path):
    report_file(tmp_path)
    document = "Intro.\n<!-- include reports/table.md (a note) -->\n| stale |\n<!-- end include -->\nOutro.\n"
    rewritten = include_tables(document, tmp_path)
    assert rewritten == (
        "Intro.\n<!-- include reports/table.md (a note) -->\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "<!-- end include -->\nOutro.\n"
    )
    assert include_tables(rewritten, tmp_path) == rewritten
    assert include_tables("No includes.\n", tmp_path) == "No includes.\n"


def test_include_errors_name_the_document_line_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"doc\.md:2: includes reports/none\.md, which is not a file"):
        include_tables("x\n<!-- include reports/none.md -->\n<!-- end include -->\n", tmp_path, "doc.md")
    report_file(tmp_path)
    with pytest.raises(ValueError, match=r"doc\.md:1: the include of reports/table\.md has no '<!-- end include -->'"):
        include_tables("<!-- include reports/table.md -->\n| a |\n", tmp_path, "doc.md")


def test_docs_command_rewrites_stale_documents_and_check_names_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_file(tmp_path)
    (tmp_path / "docs").mkdir()
    stale = "<!-- include reports/table.md -->\n| old |\n<!-- end include -->\n"
    (tmp_path / "README.md").write_text(stale)
    (tmp_path / "docs/page.md").write_text("No tables.\n")
    checked = CliRunner().invoke(app, ["docs", "--check"])
    assert checked.exit_code == 1 and "out of date: README.md; run `python cli.py docs`" in checked.output
    assert (tmp_path / "README.md").read_text() == stale
    assert CliRunner().invoke(app, ["docs"]).output == "rewrote README.md\n"
    assert "| 1 | 2 |" in (tmp_path / "README.md").read_text()
    again = CliRunner().invoke(app, ["docs", "--check"])
    assert again.exit_code == 0 and again.output == "up to date: README.md, docs/page.md\n"


def test_the_readme_shows_the_paper_table_of_reports():
    text = README.read_text()
    assert "<!-- include reports/paper_table.md" in text
    assert first_table((ROOT / "reports/paper_table.md").read_text()) in text


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_included_tables_equal_the_reports(document):
    text = document.read_text()
    assert include_tables(text, ROOT, doc_id(document)) == text, (
        f"{doc_id(document)} shows a table that differs from its report: run `python cli.py docs`"
    )


def test_findings_name_the_fp_model_of_the_committed_tables():
    """Prose that reads the tables names the FP model it read them for: after a regeneration that trained
    another model, this fails until someone has read the findings again against the new tables."""
    committed = re.search(r"FP model (\w+)", (ROOT / "reports/paper_table.md").read_text()).group(1)
    named = {doc_id(d): re.findall(r"findings on FP model `(\w+)`", d.read_text()) for d in DOCUMENTS}
    assert named[doc_id(README)], "the README's findings name no FP model"
    assert all(model == committed for models in named.values() for model in models), (
        f"reports/paper_table.md is of FP model {committed}; the findings name {named}"
    )


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings (code blocks skipped)."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    titles = re.findall(r"^#+ (.+)$", prose, re.M)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") for title in titles}


@pytest.mark.parametrize("document", DOCUMENTS, ids=doc_id)
def test_links_resolve(document):
    text = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in heading_anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{doc_id(document)}: " + "; ".join(broken)


def test_ci_runs_the_readme_install_and_test_commands():
    block = re.search(r"^## Three commands\n.*?^```bash\n(.*?)^```", README.read_text(), re.S | re.M).group(1)
    shown = [line for line in block.splitlines() if line.startswith(("pip install", "ruff check"))]
    assert len(shown) == 2, block
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert all(line in ci for line in shown), f".ci/run must run the README's commands as shown: {shown}"


def test_the_readme_reads_in_five_minutes():
    assert len(README.read_text().splitlines()) <= 200, "the README is a product page: depth goes to docs/"


@pytest.mark.parametrize("command", [c for c in SHOWN if not is_cheap(c)], ids=shlex.join)
def test_every_shown_command_parses(command):
    """Commands too slow to run here at least name a subcommand and options that exist."""
    result = CliRunner().invoke(app, [*command[2:], "--help"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", [c for c in SHOWN if is_cheap(c)], ids=shlex.join)
def test_cheap_shown_command_runs_as_shown(reproduced, command):
    run([sys.executable, *command[1:]], reproduced[0])
