"""The docs name what exists: every setting is documented, every documented setting and make target is real."""

from __future__ import annotations

import re

from conftest import ROOT
from service.settings import Settings

README = (ROOT / "README.md").read_text(encoding="utf-8")
COMPOSE_ONLY = {"SCS_PUBLISH_PORT", "SCS_PUBLISH_GRPC_PORT", "SCS_CPUS"}  # docker-compose.yml's own knobs, documented under Docker


def test_every_setting_is_in_the_configuration_table_and_every_documented_one_exists():
    table = README[README.index("## Configuration"):]
    table = table[:table.index("\n## ")]
    documented = set(re.findall(r"^\| `(SCS_[A-Z_]+)` \|", table, flags=re.MULTILINE))
    settings = {f"SCS_{name.upper()}" for name in Settings.model_fields}
    assert settings == documented, (settings - documented, documented - settings)
    mentioned = set(re.findall(r"\bSCS_[A-Z_]*[A-Z]\b", README)) - COMPOSE_ONLY
    assert mentioned <= settings, mentioned - settings


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    for doc in ("README.md", "BENCHMARKS.md", "RELIABILITY.md"):
        named = set(re.findall(r"`make ([a-z][a-z-]*)", (ROOT / doc).read_text(encoding="utf-8")))
        assert named <= targets, f"{doc} names make targets that do not exist: {named - targets}"


def test_every_script_the_docs_name_exists():
    for doc in ("README.md", "BENCHMARKS.md", "RELIABILITY.md", "docs/architecture.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        for path in set(re.findall(r"\b((?:scripts|loadtest|service|model_export|tests)/[\w/.-]+\.(?:py|sh))", text)):
            assert (ROOT / path).is_file(), f"{doc} names {path}, which does not exist"
        for module in set(re.findall(r"python -m ((?:loadtest|service|model_export)(?:\.\w+)*)", text)):
            parts = module.split(".")
            assert (ROOT.joinpath(*parts).with_suffix(".py").is_file() or (ROOT.joinpath(*parts) / "__main__.py").is_file()), \
                f"{doc} runs python -m {module}, which does not exist"
