"""The documents stay true to the code: every error message is in docs/troubleshooting.md."""
import re

from conftest import ROOT

LITERAL = re.compile(r'UserError\(\s*f?"([^"]*)"')


def error_messages() -> list[tuple[str, str]]:
    found = []
    for path in sorted((ROOT / "hpcaux").rglob("*.py")):
        found += [(str(path.relative_to(ROOT)), m.group(1)) for m in LITERAL.finditer(path.read_text())]
    return found


def test_every_error_message_is_in_troubleshooting():
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    messages = error_messages()
    assert len(messages) > 50
    missing = []
    for where, message in messages:
        fixed = max(re.split(r"\{[^}]*\}", message), key=len).strip()
        if fixed not in doc:
            missing.append(f"{where}: {fixed!r}")
    assert not missing, "\n".join(missing)
