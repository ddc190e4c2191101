"""The author's guide (docs/authors-guide.md) holds a complete, small consumer.

The VM test (``tests/vm/test_authors_guide.py``) builds and runs the guide's
blocks against the real module; these host checks keep the page's promises
that need no kernel: every file the example needs is in it, the module is
under 100 lines and uses nothing of kmlbus but its public header, and the
configuration loads with the bus's own loader.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kmlbus.bus.config import loads
from kmlbus.contract import spec
from tests.support.mdblocks import file_blocks

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "authors-guide.md"


def blocks() -> dict[str, str]:
    return file_blocks(GUIDE)


def test_the_guide_has_every_file_of_its_example() -> None:
    assert set(blocks()) == {"kmlbus_hello.c", "Kbuild", "build.sh", "make_model.py", "hello.toml"}


def test_the_example_module_is_under_100_lines_on_the_public_api_only() -> None:
    c = blocks()["kmlbus_hello.c"]
    assert len(c.splitlines()) < 100
    includes = re.findall(r"^#include\s+[<\"]([^>\"]+)[>\"]", c, re.MULTILINE)
    ours = [i for i in includes if "kmlbus" in i]
    assert ours == ["kmlbus/kmlbus.h"], includes
    assert 'MODULE_LICENSE("GPL")' in c  # the API is EXPORT_SYMBOL_GPL


def test_the_guides_limits_are_the_specs() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    assert f"up to {spec.load().consts['max-features']} `s32` values" in text


def test_the_kbuild_file_builds_the_module_of_the_c_block() -> None:
    assert "obj-m += kmlbus_hello.o" in blocks()["Kbuild"]


def test_the_guides_bus_configuration_loads(tmp_path: Path) -> None:
    cfg = loads(blocks()["hello.toml"], tmp_path / "hello.toml")
    assert "hello" in cfg.proxies
    assert Path(cfg.proxies["hello"].model).name == "hello.onnx"


def test_two_blocks_naming_one_file_are_refused(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("```c file=a.c\nx\n```\n\n```c file=a.c\ny\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="file=a.c"):
        file_blocks(page)


def test_a_host_build_is_used_only_while_the_page_and_the_header_are_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tests/support/guide_build.py builds the example on the host for the VM test; the VM test
    # must fall back to building the page's text itself once that text has moved on.
    from tests.support import guide_build

    folder = tmp_path / "built"
    folder.mkdir()
    assert not guide_build.is_current(folder)  # nothing built
    (folder / guide_build.STAMP).write_text(guide_build.stamp() + "\n")
    assert guide_build.is_current(folder)
    page = tmp_path / "guide.md"
    page.write_text(GUIDE.read_text().replace("63 * load", "62 * load"))
    monkeypatch.setattr(guide_build, "GUIDE", page)
    assert not guide_build.is_current(folder)  # a block changed since the build
