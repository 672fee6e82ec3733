"""One benchmark's section of bench/README.md, replaced in place.

Every bench script owns the ``## `` sections whose headings it writes: a rerun replaces its own
section (up to the next ``## `` heading; ``### `` subsections belong to it) and leaves the
others, hand-written notes included, alone. A heading not yet in the file is appended.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().with_name("README.md")


def update_readme(readme: Path, heading: str, section: str) -> None:
    """Put ``section`` (which starts with ``heading``) in ``readme`` in place of the section so headed."""
    text = readme.read_text() if readme.exists() else "# Benchmarks\n\nEach table lists the command that produced it.\n"
    block = section.rstrip("\n") + "\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    # a function, not a replacement string: a section's own backslashes (escaped "|" in table cells) stay as written
    text = pattern.sub(lambda _: block, text, count=1) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    readme.write_text(text.rstrip("\n") + "\n")
