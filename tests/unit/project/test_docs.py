"""The front page and the guides point at things that exist: links, repository paths, `sclslt` commands.

Reads README.md, CONTRIBUTING.md and docs/*.md. Fast (no training, no subprocess).
"""

import re
from pathlib import Path

from tests.helpers import ROOT

README_MAX_LINES = 220

# A backtick token is read as a repository path when it has a '/' and ends in one of these, or starts
# with one of the repository's top-level folders.
PATH_SUFFIXES = (
    ".py",
    ".md",
    ".json",
    ".yaml",
    ".yml",
    ".sh",
    ".csv",
    ".cff",
    ".txt",
    ".png",
    ".sbatch",
    ".ini",
    ".cfg",
    ".toml",
)
PATH_PREFIXES = ("tools/", "sclslt/", "tests/", "configs/", "benchmarks/", "launch/", "kernels/", "docs/")

# Paths written in the docs that are examples of a user's own files, not files of this repository.
# Keep it short; each entry says why it is not a repository path.
USER_PATHS = {
    "SHARDS/train.json",  # a user's shard directory's train manifest (experiments.pair_selection.partners --manifest)
}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)


def split_code(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The prose (fenced blocks removed) and the fenced blocks as (language, body)."""
    blocks = [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    return FENCE.sub("", text), blocks


def inline_code(prose: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose)


def links(text: str) -> list[str]:
    prose, _ = split_code(text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def is_placeholder(token: str) -> bool:
    """`<run_dir>/config.yaml`, `$C/reference.yaml`, `~/.cache/...`, `{1,2}`: a pattern, not one file."""
    return any(c in token for c in "<>${}~") or token.startswith("/")  # absolute: a user's machine


def looks_like_path(token: str) -> bool:
    return ("/" in token and token.endswith(PATH_SUFFIXES)) or token.startswith(PATH_PREFIXES)


def path_tokens(text: str) -> list[str]:
    """Repository-looking paths in inline code and in bash/sh/python/text blocks (unlabelled diagrams are left out)."""
    prose, blocks = split_code(text)
    spans = inline_code(prose) + [body for lang, body in blocks if lang in ("bash", "sh", "python", "text")]
    out = []
    for span in spans:
        for tok in re.split(r"[\s=\"',()|]+", span):
            tok = tok.strip(".:;")
            if tok and not tok.startswith("-") and "://" not in tok and looks_like_path(tok):
                out.append(tok)
    return out


def exists(path: str) -> bool:
    if any(c in path for c in "*?["):
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def test_relative_links_resolve():
    """Every relative link of the README, CONTRIBUTING.md and the guides points at a file or folder.

    Mutation caught: a guide renamed (docs/kernels.md -> docs/kernel.md) without its links updated, or a
    results file linked under benchmarks/results/ deleted."""
    broken = []
    for f in doc_files():
        for target in links(f.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # http(s)://, mailto:, an anchor on the same page
            rel = target.split("#", 1)[0]
            if not (f.parent / rel).exists():
                broken.append(f"{f.relative_to(ROOT)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_backticked_repository_paths_exist():
    """Every repository path written in backticks (or in a bash/python block) exists, globs match something.

    Mutation caught: a tool or test file renamed (tests/e2e/chaos.py -> tools/faults.py) while a guide still
    tells users to run the old name; a benchmark result glob that no longer matches any file."""
    missing = []
    for f in doc_files():
        for tok in path_tokens(f.read_text()):
            if tok in USER_PATHS or is_placeholder(tok):
                continue
            if not exists(tok):
                missing.append(f"{f.relative_to(ROOT)}: {tok}")
    assert not missing, "paths that are not in the repository:\n" + "\n".join(sorted(set(missing)))


def known_commands() -> set[str]:
    from sclslt.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices) | {"train"}


def named_commands(text: str) -> set[str]:
    """`sclslt X` and `sclslt.cli X` in inline code and in shell/python blocks (not in prose or diagrams)."""
    prose, blocks = split_code(text)
    code = inline_code(prose) + [body for lang, body in blocks if lang in ("bash", "sh", "python")]
    pattern = re.compile(r"(?:^|[\s`(|&;])(?<!from )sclslt(?:\.cli)?[ \t]+([a-z][\w-]*)", re.M)  # not Python
    return {m for span in code for m in pattern.findall(span)}


def test_named_sclslt_commands_exist():
    """Every `sclslt <command>` the docs name is a subcommand of `sclslt.cli.build_parser()` (or train).

    Mutation caught: the docs telling users to run `sclslt serve` (a command that does not exist), or a
    subcommand dropped from the CLI while the docs still name it."""
    named = {}
    for f in doc_files():
        for cmd in named_commands(f.read_text()):
            named.setdefault(cmd, []).append(f.relative_to(ROOT).as_posix())
    unknown = {c: fs for c, fs in named.items() if c not in known_commands()}
    assert not unknown, f"commands the CLI does not know: {unknown}"


def test_readme_is_a_front_page_linking_every_guide():
    """The README stays within 220 lines and links every guide under docs/.

    Mutation caught: a new guide added to docs/ that the README never links (an orphan page), or the
    detailed material pasted back into the README (over 220 lines)."""
    text = (ROOT / "README.md").read_text()
    n = len(text.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"
    linked = {t.split("#", 1)[0] for t in links(text)}
    orphans = [
        g.relative_to(ROOT).as_posix()
        for g in sorted((ROOT / "docs").glob("*.md"))
        if g.relative_to(ROOT).as_posix() not in linked
    ]
    assert not orphans, f"guides the README does not link: {orphans}"


def test_the_configuration_guides_field_reference_is_the_configs_own():
    """docs/configuration.md's field reference is what `sclslt.config.field_reference()` makes from the typed
    config and its comments (the same rows `sclslt train --help` prints). Mutation caught (checked): a field
    added to the config (or its comment changed) without regenerating the guide. Regenerate with
    python -c "from sclslt.config import write_field_reference; write_field_reference()"."""
    import subprocess
    import sys

    from sclslt.config import REFERENCE_MARK

    text = (ROOT / "docs" / "configuration.md").read_text()
    assert REFERENCE_MARK in text
    # in a fresh interpreter: the suite's own registrations (a test head) are not the product's names
    made = subprocess.run(
        [sys.executable, "-c", "from sclslt.config import field_reference; print(field_reference(), end='')"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    assert text.split(REFERENCE_MARK, 1)[1] == "\n\n" + made.stdout, "regenerate: see this test's docstring"
