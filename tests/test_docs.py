"""The README is the user's guide: short, the two setup commands first, the test command findable, measurements in
one linked results document, and no mention of settings that no longer exist."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
README_LIMIT = 20_000  # bytes


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text):
    """The contents of the ``` fenced code blocks, in order."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def test_readme_is_at_most_20000_bytes():
    size = os.path.getsize(README)
    assert size <= README_LIMIT, f"README.md is {size:,} bytes, over {README_LIMIT:,}: move measurements to " \
                                 "bench/RESULTS.md"


def test_readme_links_the_results_document_and_it_exists():
    assert "bench/RESULTS.md" in read(README)
    assert os.path.isfile(RESULTS)
    assert read(RESULTS).strip(), "bench/RESULTS.md is empty"


def test_quick_start_gives_the_two_commands_first():
    blocks = fenced_blocks(read(README))
    assert blocks, "README.md has no fenced code block"
    first = blocks[0]
    assert "uv run prepare_mlx_mamba_3.py" in first
    assert re.search(r"uv run train_\w+\.py", first), "the first code block has no training command"
    commands = [line for line in first.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "prepare_mlx_mamba_3.py" in commands[0], "the prep command comes first"


def test_readme_has_the_test_command():
    # CI (.ci/run) runs "the README's test command"
    assert re.search(r"^uv run pytest\s*$", read(README), flags=re.M)


def test_readme_does_not_mention_removed_settings():
    text = read(README)
    for gone in ("AUTORESEARCH_MLX_ARCHITECTURE", "Experiment overrides"):
        assert gone not in text, f"README.md still mentions {gone!r}"


def test_readme_local_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(README)):
        if "://" not in target:
            assert os.path.exists(os.path.join(ROOT, target)), f"README.md links a missing file: {target}"


def test_readme_keeps_the_sections_program_md_points_at():
    # program.md sends agents that are one of several to these two parts of the README
    text = read(README)
    assert re.search(r"^## More than one device$", text, flags=re.M)
    assert "**The agents' side**" in text
