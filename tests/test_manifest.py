"""One manifest schema: the provenance every output carries, its checker, and its description in docs/outputs.md.

The train, merge, destroy, plugin apply, delta and eval outputs are checked against `manifest_problems` in the tests
that make them (test_train, test_gadgets, test_eval); here the checker itself must catch what it is for.
"""

from __future__ import annotations

import json

import pytest

from helpers import REPO
from sfn_train.errors import SfnError
from sfn_train.manifest import KINDS, MANIFEST_FILE, PROVENANCE_FIELDS, manifest_problems, new_manifest, write_manifest


def test_new_manifest_follows_the_schema_and_puts_provenance_first():
    manifest = new_manifest("merge", "sfn merge A B --out m", alpha=0.5)
    assert manifest_problems(manifest) == []
    assert list(manifest)[: len(PROVENANCE_FIELDS)] == list(PROVENANCE_FIELDS)
    assert manifest["command"] == "sfn merge A B --out m" and manifest["alpha"] == 0.5
    assert manifest["written_at"].endswith("+00:00")
    with pytest.raises(ValueError, match="provenance"):
        new_manifest("merge", None, versions={})
    with pytest.raises(ValueError, match="kind"):
        new_manifest("gadget", None)


@pytest.mark.parametrize("damage, problem", [
    (lambda m: m.pop("git"), "no `git`"),
    (lambda m: m.update(schema="sfn-manifest/0"), "`schema`"),
    (lambda m: m.update(kind="gadget"), "`kind`"),
    (lambda m: m.update(written_at="yesterday"), "not an ISO 8601 time"),
    (lambda m: m.update(written_at="2026-01-01T10:00:00"), "no time zone"),
    (lambda m: m.update(command=["sfn", "merge"]), "`command`"),
    (lambda m: m["versions"].pop("torch"), "lacks python, sfn-train or torch"),
    (lambda m: m["versions"].update(torch=2), "`versions`"),
    (lambda m: m.update(git={"revision": None}), "`git`"),
])
def test_manifest_problems_names_what_is_wrong(damage, problem):
    manifest = new_manifest("eval", "sfn eval x")
    damage(manifest)
    problems = manifest_problems(manifest)
    assert len(problems) == 1 and problem in problems[0], problems


def test_write_manifest_is_atomic_and_readable(tmp_path, monkeypatch):
    written = write_manifest(tmp_path, "destroy", "sfn destroy M --out d", mode="zero")
    assert json.loads((tmp_path / MANIFEST_FILE).read_text()) == written
    assert not list(tmp_path.glob(".tmp-*"))

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(SfnError, match="no space left"):
        write_manifest(tmp_path, "destroy", "sfn destroy M --out d", mode="noise")
    monkeypatch.undo()
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["mode"] == "zero"  # the old record is intact
    assert not list(tmp_path.glob(".tmp-*"))


def test_docs_document_every_provenance_field_and_kind():
    page = (REPO / "docs" / "outputs.md").read_text()
    section = page.split("## What every output records", 1)[1].split("\n## ", 1)[0]
    for field in PROVENANCE_FIELDS:
        assert f"| `{field}` |" in section, field
    for kind in KINDS:
        assert f"- `{kind}`:" in section, kind
