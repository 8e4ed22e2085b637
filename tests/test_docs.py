"""The README is a front page and every link in the docs leads somewhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
SEED_COMMANDS = [
    "pip install -r requirements.txt",
    "python train.py --config config/model_config.yaml --train_steps 5000",
    "python train.py --config config/model_config.yaml --train_steps 50 --checkpoint_path checkpoints/step_5000.pt",
]


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert readme.index("make demo") < readme.index("make test") < 1000  # the two commands open it
    for command in SEED_COMMANDS:
        assert command in readme


def test_every_relative_link_resolves():
    broken = []
    for document in documents():
        for target in LINK.findall(document.read_text()):
            if "://" in target:
                continue
            if not (document.parent / target).exists():
                broken.append(f"{document.relative_to(ROOT)} -> {target}")
    assert not broken, broken
