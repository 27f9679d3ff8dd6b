"""Data shared by the training script and the harnesses: the code corpus, its held-out split,
the arithmetic task, and the prompts built from them.

Everything here is a pure function of its arguments (and of the Python installation, for the
standard-library corpus), so `build_scripts/train_pair.py`, `hf-smcsd bench` and
`hf-smcsd fidelity` agree on what was held out.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)  # ids 0 and 1 in the trained tokenizer

# Directory names skipped in the standard library: third-party packages, the test suites
# (18 MB of mostly repetitive test code), and pydoc's 750 kB string table.
SKIPPED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"})
HELDOUT_EVERY = 50  # every 50th file (sorted by path) is held out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's `.py` files, sorted by relative path (a deterministic order)."""
    root = Path(root) if root is not None else stdlib_root()
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & SKIPPED_PARTS)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(files: list[Path], every: int = HELDOUT_EVERY) -> tuple[list[Path], list[Path]]:
    """(train, held out): file i is held out when i % every == 0."""
    if every < 2:
        raise ValueError(f"every={every!r}: use an integer >= 2 (1 in `every` files is held out).")
    train = [f for i, f in enumerate(files) if i % every]
    heldout = [f for i, f in enumerate(files) if not i % every]
    return train, heldout


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# --- The arithmetic task: "a+b=c" lines, answers checkable. ---
#
# Numbers are written at fixed width with leading zeros ("007+045=0052"): every digit then sits
# at the same distance from "+" and "=" in every problem, which small transformers learn in
# minutes on a CPU, where the same task with unpadded numbers ("7+45=52") was not learned at
# all in the same budget (0% after 32 minutes). Operands still have 1 to 3 significant digits.

MAX_DIGITS = 3
HELDOUT_MODULUS = 20  # about 1 problem in 20 is held out (never trained on)


def is_heldout_problem(a: int, b: int) -> bool:
    """A fixed pseudo-random 1-in-20 subset of all (a, b): never used for training."""
    h = ((a * 1_000_003 + b) * 2_654_435_761) % (1 << 32)
    return (h >> 7) % HELDOUT_MODULUS == 0


def random_operand(rng: random.Random, max_digits: int = MAX_DIGITS) -> int:
    """A number whose digit count is uniform in 1..max_digits, then uniform among those."""
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_problems(rng: random.Random, count: int, heldout: bool = False,
                    max_digits: int = MAX_DIGITS) -> list[tuple[int, int]]:
    """`count` problems (a, b) from the training side (default) or the held-out side."""
    if count < 0:
        raise ValueError(f"count={count!r}: use an integer >= 0.")
    problems = []
    while len(problems) < count:
        a, b = random_operand(rng, max_digits), random_operand(rng, max_digits)
        if is_heldout_problem(a, b) == heldout:
            problems.append((a, b))
    return problems


def heldout_problems(count: int, seed: int = 1234, max_digits: int = MAX_DIGITS) -> list[tuple[int, int]]:
    """`count` distinct held-out problems, the same for the same seed."""
    rng = random.Random(seed)
    seen, problems = set(), []
    limit = 10 * count + 1000
    for _ in range(limit):
        if len(problems) == count:
            break
        (p,) = sample_problems(rng, 1, heldout=True, max_digits=max_digits)
        if p not in seen:
            seen.add(p)
            problems.append(p)
    if len(problems) < count:
        raise ValueError(f"count={count!r}: only {len(problems)} distinct held-out problems were found.")
    return problems


def format_operand(value: int, max_digits: int = MAX_DIGITS) -> str:
    return f"{value:0{max_digits}d}"


def format_answer(value: int, max_digits: int = MAX_DIGITS) -> str:
    return f"{value:0{max_digits + 1}d}"


def problem_line(a: int, b: int) -> str:
    """`a+b=c` and a newline, operands at MAX_DIGITS digits, the sum at one more."""
    return f"{format_operand(a)}+{format_operand(b)}={format_answer(a + b)}\n"


def problem_prompt(a: int, b: int) -> str:
    """The prompt for one problem, as the models saw problems in training (after EOS)."""
    return f"{EOS}{format_operand(a)}+{format_operand(b)}="


def parse_answer(text: str) -> str:
    """The answer part of a continuation: up to the first newline or EOS, stripped."""
    for stop in ("\n", EOS):
        text = text.split(stop, 1)[0]
    return text.strip()


def is_correct(a: int, b: int, continuation: str) -> bool:
    """The continuation's answer, all digits, equals a + b (leading zeros allowed)."""
    answer = parse_answer(continuation)
    return answer.isdigit() and int(answer) == a + b


def task_text(rng: random.Random, min_chars: int) -> str:
    """A training block: EOS, then problem lines until at least `min_chars` characters."""
    parts, size = [EOS], 0
    while size < min_chars:
        (a, b), = sample_problems(rng, 1)
        line = problem_line(a, b)
        parts.append(line)
        size += len(line)
    return "".join(parts)


# --- Code prompts from held-out files. ---

def code_prompts(count: int, min_lines: int = 3, max_chars: int = 160, root: str | Path | None = None) -> list[str]:
    """`count` distinct prompts from held-out standard-library files: each is the text of a
    file up to and including a `def` line (a function signature to continue), at most
    `max_chars` characters, spread over the held-out files in a fixed order."""
    _, heldout = split_files(stdlib_files(root))
    prompts: list[str] = []
    per_file = max(1, -(-count // max(1, len(heldout))))
    for path in heldout:
        lines = read_source(path).splitlines(keepends=True)
        taken = 0
        for i, line in enumerate(lines):
            if taken >= per_file or len(prompts) >= count:
                break
            if line.lstrip().startswith("def ") and line.rstrip().endswith(":") and i >= min_lines:
                start = max(0, i - min_lines)
                text = "".join(lines[start : i + 1])[-max_chars:]
                if text not in prompts:  # some files share boilerplate (e.g. the codecs)
                    prompts.append(text)
                    taken += 1
        if len(prompts) >= count:
            break
    if len(prompts) < count:
        raise ValueError(f"count={count!r}: only {len(prompts)} code prompts could be built from held-out files.")
    return prompts
