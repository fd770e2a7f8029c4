"""The README's two maps stay true: its table of contents lists every section, in
order, with the anchor GitHub gives it; its "Layout" names every module of the package
and every file it names exists."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CONTENTS = "## Contents"


def section(title: str) -> str:
    start = README.index(f"\n{title}\n") + len(title) + 2
    end = README.find("\n## ", start)
    return README[start : end if end >= 0 else len(README)]


def github_anchor(heading: str) -> str:
    """GitHub's slug of a heading: lower case, punctuation but `-` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_contents_list_every_section_in_order() -> None:
    prose = FENCE.sub("", README)  # a `# comment` in a code block is not a heading
    headings = [line[3:] for line in prose.splitlines() if line.startswith("## ")]
    headings.remove(CONTENTS[3:])
    listed = re.findall(r"^- \[(.+)\]\(#([^)]+)\)$", section(CONTENTS), re.M)
    assert [title for title, _ in listed] == headings
    for title, anchor in listed:
        assert anchor == github_anchor(title), title


def layout_entries() -> dict[str, str]:
    """The Layout block as {path: its text}: an entry starts at two spaces' indent under
    its top-level folder (`deepmode_async/`, `tests/`, ...) and runs on deeper lines."""
    block = FENCE.search(section("## Layout"))
    assert block is not None
    entries: dict[str, str] = {}
    top = name = ""
    for line in block[0].splitlines()[1:-1]:
        indent = len(line) - len(line.lstrip())
        first, _, rest = line.strip().partition(" ")
        if indent == 0:
            top = name = first
        elif indent == 2:
            name = top + first
        else:
            rest = line
        entries[name] = entries.get(name, "") + " " + rest
    return entries


def test_the_layout_names_every_module_of_the_package() -> None:
    entries = layout_entries()
    missing = []
    for path in sorted((ROOT / "deepmode_async").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        folder = path.parent.relative_to(ROOT).as_posix() + "/"
        if relative in entries or (path.name == "__init__.py" and folder in entries):
            continue
        named = re.search(rf"(?<![\w.]){re.escape(path.name)}\b", entries.get(folder, ""))
        if folder != "deepmode_async/" and named:
            continue  # a module of a subpackage, named in its folder's entry
        missing.append(relative)
    assert not missing, f"modules the README's Layout does not name: {missing}"


def test_every_file_the_layout_names_exists() -> None:
    stale = []
    for name, text in layout_entries().items():
        named = [name]
        if name.endswith("/"):  # and the files its text names, in that folder
            named += [name + file for file in re.findall(r"[\w.]+\.py\b", text)]
        stale += [path for path in named if not (ROOT / path).exists()]
    assert not stale, f"named in the README's Layout but not in the repository: {stale}"
