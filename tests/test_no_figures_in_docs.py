"""No measured figure in a docstring or comment of pitchkeras/ or server/: figures live in BUILD_NOTES.md.

A measurement in a docstring goes stale the day the code it describes gets faster; BUILD_NOTES.md keeps each
figure with its machine, settings and date. What counts as a measurement here: a rate (`120 tokens/s`), a
ratio (`7x faster`, `16×`), or a time, size or percentage said next to a word of measuring (measured,
profiled, takes, costs, faster, per step, on 2 cores, about, ~ ...). Limits and settings (`a 10 s deadline`,
`gRPC's 8 KiB metadata limit`) and values in backticks are not measurements.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("pitchkeras", "server")
GENERATED = "pitchkeras/v1/"

_NUMBER = r"[~≈]?\d+(?:[.,]\d+)*(?:\s?(?:-|–|to)\s?\d+(?:[.,]\d+)*)?"
_RATE = re.compile(_NUMBER + r"\s?(?:tokens|reviews|rows|samples|steps|examples|requests|it|[KMG]i?B)/s\b")
_RATIO = re.compile(_NUMBER + r"\s?(?:×|x(?= (?:faster|slower|less|more|fewer|smaller|larger|the)\b))")
_QUANTITY = re.compile(r"(?<![\w.])" + _NUMBER
                       + r"\s?(?:ms|µs|us|s|secs?|seconds|min|minutes|h|hours|[KMGT]i?B|%)(?![\w/])")
_MEASURING = re.compile(
    r"measur|profil|benchmark|\btook\b|\btakes?\b|\bcosts?\b|faster|slower|speed|\bvs\.?\b|\bagainst\b|"
    r"\bon \d+ (?:idle )?cores\b|-core\b|\bper (?:step|token|call|row|review)\b|\babout\b|~|≈|\boff\b|"
    r"\bsaves?\b|\bspent\b|\bdominat")


def measured_figures(text: str, context: str = "") -> list[str]:
    """The measured figures in `text`; the words of measuring may also sit in `context` (the lines around it)."""
    text, context = (re.sub(r"`[^`]*`", "", part) for part in (text, context))
    found = [m.group(0) for m in _RATE.finditer(text)] + [m.group(0) for m in _RATIO.finditer(text)]
    if _MEASURING.search(text) or _MEASURING.search(context):
        found += [m.group(0) for m in _QUANTITY.finditer(text)]
    return found


def _documentation(path: Path):
    """(line number, text, context) of every comment and every line of every docstring in `path`."""
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string, ""
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                lines = docstring.splitlines()
                for i, line in enumerate(lines):
                    # A sentence runs over lines: the word of measuring may sit on the line before or after.
                    yield node.body[0].lineno + i, line, " ".join(lines[max(i - 1, 0): i + 2])


def figures_in(folder: Path) -> list[str]:
    """`file:line: figure` for every measured figure in the docstrings and comments under `folder`."""
    hits = []
    for path in sorted(folder.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if not relative.startswith(GENERATED):
            hits += [f"{relative}:{line}: {figure}" for line, text, context in _documentation(path)
                     for figure in measured_figures(text, context)]
    return hits


def test_measured_figures_are_recognised_and_limits_are_not():
    assert measured_figures("Eager calls are measured 7x faster than the traced tokenizer") == ["7x"]
    assert measured_figures("on GPT-2 124M 27.8 ms per token") == ["27.8 ms"]
    assert measured_figures("generates 950 tokens/s on the demo model") == ["950 tokens/s"]
    assert measured_figures("prepare got 16× faster") == ["16×"]
    assert measured_figures("gates take 15-18% off a GPT-2 step") == ["15-18%"]
    assert measured_figures("a 100 MB corpus costs about 140 MB") == ["100 MB", "140 MB"]
    assert measured_figures("Longest message: far below gRPC's 8 KiB metadata limit") == []
    assert measured_figures("Clients' keepalive pings: allowed every 10 s at most") == []
    assert measured_figures("a size like `16GB` or `800MB`; -1: a tenth of the steps") == []


def test_no_measured_figure_in_docstrings_or_comments():
    hits = [hit for folder in FOLDERS for hit in figures_in(ROOT / folder)]
    assert not hits, ("measured figures in docstrings/comments (move them to BUILD_NOTES.md and point there):\n"
                      + "\n".join(hits))


# The engine's own package docstring is the engine's to write (issue 29 leaves sampling/ to issue 26).
UNLISTED_PACKAGES = ("pitchkeras/sampling",)


def test_package_docstrings_list_their_modules():
    missing = []
    for folder in ("pitchkeras", "server", "client"):
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            package = init.parent
            relative = package.relative_to(ROOT).as_posix()
            if relative.startswith(GENERATED.rstrip("/")) or relative in UNLISTED_PACKAGES:
                continue
            docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
            names = [p.stem for p in package.glob("*.py") if p.stem != "__init__"]
            names += [p.name for p in package.iterdir() if (p / "__init__.py").is_file()]
            missing += [f"{relative}: {name}" for name in sorted(names)
                        if not re.search(rf"`{re.escape(name)}(?:\.py|/)?`", docstring)]
    assert not missing, "modules their package's docstring does not name (as `name`):\n" + "\n".join(missing)
