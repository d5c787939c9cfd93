"""The README's Python snippets run as written (issue 2)."""

from __future__ import annotations

import re

from .helpers import REPO


def _snippet(tag: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- readme-snippet: {tag} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"snippet {tag} missing from README"
    return m.group(1)


def test_api_snippet(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_snippet("api"), "README.md", "exec"), {})
    assert (tmp_path / "example.int8.onnx").exists()
    out = capsys.readouterr().out
    assert out.startswith("ptq {'remove-identity': {}, 'insert-qdq'")


def test_pattern_snippet_matches_example_file():
    ns: dict = {}
    exec(compile(_snippet("pattern"), "README.md", "exec"), ns)
    assert ns["PATTERNS"][0].name == "drop-identity"
    assert "class DropIdentity(Pattern)" in (REPO / "patterns" / "drop_identity.py").read_text()


def test_readme_commands_are_the_ci_commands():
    text = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && python -m pytest' in text
    assert 'pip install -e ".[dev]" && python -m pytest' in ci
    assert "pip install . && qdqsurgeon optimize --example out.onnx" in text
