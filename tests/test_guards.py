"""Guards of the two files the agent rewrites: every hand-written gradient is checked against autodiff of its own
forward when a run starts (a bent forward stops the run with a one-line error naming it), and the sections the two
MLX scripts share are identical on main (a line added to one copy fails here)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_mamba_3_mlx.py", "train_hybrid_moe_mlx.py")
SHARED_SECTIONS = ("Mamba", "Loss, optimizer, schedule", "Speed machinery")


def read(script):
    with open(os.path.join(ROOT, script)) as f:
        return f.read()


def sections(text):
    """{name: text} of every block from a `# SECTION: name` banner to its `# END SECTION: name` banner."""
    found = {}
    for match in re.finditer(r"^# SECTION: ([^\[\n]+?)\s*(?:\[.*\])?$", text, flags=re.M):
        name = match.group(1).split(" (")[0]
        end = re.search(rf"^# END SECTION: {re.escape(name)}$", text[match.end():], flags=re.M)
        assert end, f"section {name!r} has no END SECTION banner"
        found[name] = text[match.start() : match.end() + end.start()]
    return found


def shared_section_differences(text_a, text_b):
    a, b = sections(text_a), sections(text_b)
    problems = [f"section {name!r} missing" for name in SHARED_SECTIONS if name not in a or name not in b]
    problems += [f"section {name!r} differs" for name in SHARED_SECTIONS
                 if name in a and name in b and a[name] != b[name]]
    return problems


def test_shared_sections_are_identical_in_both_scripts():
    assert shared_section_differences(read(SCRIPTS[0]), read(SCRIPTS[1])) == []


def test_a_line_inserted_into_one_copy_is_caught():
    hybrid = read(SCRIPTS[1])
    for name in SHARED_SECTIONS:
        body = sections(hybrid)[name]
        cut = body.index("\ndef ") + 1  # before the section's first function
        edited = hybrid.replace(body, body[:cut] + "# an agent's edit\n" + body[cut:])
        assert shared_section_differences(read(SCRIPTS[0]), edited) == [f"section {name!r} differs"]


def guarded_functions(text):
    """(forward, backward) of every `name = hand_written_gradient(forward, backward, ...)` line: the forward is what
    the check holds the backward to (a def of the script)."""
    return re.findall(r"^\w+ = hand_written_gradient\((?:\s*#[^\n]*)?\s*(\w+), (\w+|lambda)", text, flags=re.M)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_custom_gradient_is_registered_for_the_check(script):
    text = read(script)
    registered = guarded_functions(text)
    assert len(registered) >= 8
    for forward, backward in registered:
        assert re.search(rf"^def {forward}\(", text, flags=re.M), forward
        assert backward == "lambda" or re.search(rf"^def {backward}\(", text, flags=re.M), backward
    # only inside the registering decorator, and in checkpoint_block, whose backward is autodiff of its own forward
    # (test_checkpoint_blocks.py compares it with the uncheckpointed gradients)
    assert text.count("mx.custom_function(") == 2
    assert text.count("    recomputed = mx.custom_function(forward)\n") == 1


def bend(text, name):
    """The script with the forward of `name` bent: its first input x becomes x + 0.05 sin(3x) before anything else,
    and its hand-written gradient left as it was."""
    match = re.search(rf"^def {name}\((\w+)", text, flags=re.M)
    docstring_end = text.index('"""', text.index('"""', match.end()) + 3) + 3
    arg = match.group(1)
    return text[:docstring_end] + f"\n    {arg} = {arg} + 0.05 * mx.sin(3 * {arg})" + text[docstring_end:]


CASES = [(script, name) for script in SCRIPTS for name, _ in guarded_functions(read(script))]


@pytest.mark.parametrize("script,name", CASES)
def test_a_bent_forward_stops_the_run_at_start(script, name, tmp_path):
    result = run_copy(bend(read(script), name), tmp_path, script)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"Gradient check failed: the hand-written gradient of {name}" in result.stderr
    assert "Traceback" not in result.stderr and "step 0" not in result.stdout


def run_copy(text, tmp_path, script):
    copy = tmp_path / script
    copy.write_text(text)
    env = dict(os.environ, PYTHONPATH=ROOT)  # the copy imports the repository's prepare.py
    return subprocess.run([sys.executable, str(copy)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unregistered_custom_gradient_stops_the_run_at_start(script, tmp_path):
    """A custom gradient added with plain mx.custom_function (so never checked) is refused too."""
    text = read(script).replace('\nif __name__ == "__main__":', '\nsneaky = mx.custom_function(lambda x: 2 * x)\n\n'
                                '\nif __name__ == "__main__":')
    result = run_copy(text, tmp_path, script)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Gradient check failed: sneaky has a custom gradient that is not checked" in result.stderr
    assert "Traceback" not in result.stderr


READING_BUDGETS = {"train_mamba_3_mlx.py": 52_000, "train_hybrid_moe_mlx.py": 50_000, "train_mamba.py": 56_000}
SPEED_CUT = "# SECTION: Speed machinery"


def reading(script):
    """What program.md has the agent read of `script`: down to its speed section, less the hybrid's copy of the Mamba
    section (program.md sends it to train_mamba_3_mlx.py's copy)."""
    text = read(script)
    assert SPEED_CUT in text, f"{script}: {SPEED_CUT!r} is gone, and program.md points the agent to it"
    text = text.split(SPEED_CUT)[0]
    if script == "train_hybrid_moe_mlx.py":
        text = text.replace(sections(read(script))["Mamba"], "")
    return text


@pytest.mark.parametrize("script", READING_BUDGETS)
def test_the_agents_reading_stays_within_its_budget(script):
    """program.md, the script down to its speed section, and prepare.py's contract (down to END OF THE CONTRACT): all
    the agent must read to run the loop (karpathy/autoresearch's agent reads ~56 KB)."""
    contract = read("prepare.py")
    assert "# END OF THE CONTRACT" in contract
    sizes = {"program.md": len(read("program.md").encode()), script: len(reading(script).encode()),
             "prepare.py": len(contract.split("# END OF THE CONTRACT")[0].encode())}
    assert sum(sizes.values()) <= READING_BUDGETS[script], f"the agent's reading is {sum(sizes.values()):,} bytes " \
                                                           f"({sizes}): trim it"


def test_program_md_sends_the_hybrids_agent_past_the_shared_mamba_section():
    assert "In\n   `train_hybrid_moe_mlx.py` skip `SECTION: Mamba` too" in read("program.md")


def names_across_the_cut(text):
    """Names bound at module level below the speed cut (not also above it: a name the door rebinds is the plain
    code's own) that the code above the cut uses."""
    import ast

    cut_line = text.split(SPEED_CUT)[0].count("\n") + 1
    tree = ast.parse(text)
    bound = {True: set(), False: set()}  # below the cut?
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            t.id for target in getattr(node, "targets", []) for t in ast.walk(target) if isinstance(t, ast.Name)]
        bound[node.lineno > cut_line].update(names)
    below = bound[True] - bound[False]
    return sorted({node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and node.id in below
                   and node.lineno < cut_line})


@pytest.mark.parametrize("script", READING_BUDGETS)
def test_at_most_three_names_defined_below_the_speed_cut_are_used_above_it(script):
    """The speed section replaces what it speeds up in one place (its door); the reading calls into it by at most
    three names (train_mamba.py: once its rewrite to the same rule has landed)."""
    across = names_across_the_cut(read(script))
    assert len(across) <= 3, f"{script}: {len(across)} names defined below the speed cut are used above it: {across}"


def test_names_across_the_cut_are_seen():
    text = "def a():\n    return b() + c\n\n\nc = 1\n" + SPEED_CUT + "\n\ndef b():\n    return 0\n\n\nc = 2\n"
    assert names_across_the_cut(text) == ["b"]  # c is rebound below, not defined there


def prose_bytes(text):
    """Bytes of comments and docstrings."""
    import ast
    import io
    import tokenize

    comments = sum(len(t.string.encode()) for t in tokenize.generate_tokens(io.StringIO(text).readline)
                   if t.type == tokenize.COMMENT)
    docstrings = sum(len(node.body[0].value.value.encode()) for node in ast.walk(ast.parse(text))
                     if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                     and ast.get_docstring(node, clean=False) is not None)
    return comments + docstrings


@pytest.mark.parametrize("script,budget", [("train_mamba_3_mlx.py", 55_000), ("train_hybrid_moe_mlx.py", 70_000)])
def test_the_scripts_stay_small_and_their_prose_earns_its_place(script, budget):
    text = read(script)
    size = len(text.encode())
    assert size <= budget, f"{script}: {size:,} bytes (budget {budget:,})"
    assert prose_bytes(text) <= 0.18 * size, f"{script}: comments and docstrings are {prose_bytes(text) / size:.1%}"
    assert max(len(line) for line in text.splitlines()) <= 120
